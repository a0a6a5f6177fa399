/*
 * http_parser.h -- an HTTP/1.1 request parser that never copies: every
 * field points into the caller's buffer. Pure functions, no I/O: fuzzed by
 * fuzz/fuzz_http_parser.c.
 */
#ifndef GW_HTTP_PARSER_H
#define GW_HTTP_PARSER_H

#include <stddef.h>
#include <stdint.h>

struct gw_http_header {
    const char *name;           /* into the buffer; not NUL-terminated */
    size_t      name_len;       /* bytes */
    const char *value;          /* into the buffer; OWS trimmed */
    size_t      value_len;      /* bytes */
};

struct gw_http_head {
    const char *method;         /* into the buffer */
    size_t      method_len;     /* bytes; 1..20 */
    const char *target;         /* into the buffer: the request-target
                                   exactly as sent */
    size_t      target_len;     /* bytes */
    const char *path;           /* the target's path (up to '?'): into
                                   the buffer, or elsewhere when
                                   path_outside (see below) */
    size_t      path_len;       /* bytes */
    int         path_outside;   /* 1: path is not in the buffer (the "/"
                                   of an absolute-form target without a
                                   path, or the caller's resolved copy) */
    const char *query;          /* into the buffer: after '?', or NULL */
    size_t      query_len;      /* bytes */
    int         minor;          /* HTTP/1.<minor>: 0 or 1 */
    size_t      nheaders;       /* entries of headers in use */
    int64_t     content_length; /* bytes, or -1 when absent */
    int         chunked;        /* Transfer-Encoding: chunked */
    int         keep_alive;     /* connection persists after this one */
    int         expect_continue;/* Expect: 100-continue */
    const char *refusal;        /* static: why a refused head is refused
                                   (a smuggling shape, no Host, a
                                   transfer coding, 417, 505), or NULL:
                                   a malformed head */
    /* set by the caller before parsing; not cleared by the parser */
    struct gw_http_header *headers; /* caller's array, in order */
    size_t      max_headers;    /* entries of headers */
};

/*
 * Finds the end of the head in buf[0..len), resuming from *scanned (bytes
 * already searched, updated). Returns the head length including the blank
 * line, or 0 when it is not complete yet.
 */
size_t gw_http_head_end(const char *buf, size_t len, size_t *scanned);

/* Lines in a head of head_len bytes, less one (the request line): an
 * upper bound of its header fields, to size h->headers. */
size_t gw_http_count_fields(const char *buf, size_t head_len);

/* The method of the request line at buf (after the empty lines before
 * it), when it is read whole: 1 to 20 token bytes followed by a space.
 * Returns its length and sets *at to its offset; 0 when there is none
 * yet (or none at all). For refusals made before the head is parsed (a
 * head over the limit, one not received in time): counted and logged
 * under the method the client named. */
size_t gw_http_method_of(const char *buf, size_t len, size_t *at);

/*
 * An incomplete head buf[0..len) that already cannot become a valid
 * request: a first byte that cannot start a method (a TLS ClientHello on
 * a plain port), a method over 20 bytes, a bare LF, a bare CR or a NUL
 * anywhere, or a complete line the full parse would refuse (the request
 * line: 400 or 505; a header line: 400). Bytes before `from` passed
 * already: only the lines that end from there on are checked. Returns
 * the status then, 0 when more bytes may still make a request. h is
 * cleared as gw_http_parse_head clears it (its headers and max_headers
 * stay, unused); a refusal sets h->method_len (and h->method, into buf)
 * when the method token was read whole, followed by its space, and
 * h->refusal as the full parse would name it (505's).
 */
int gw_http_head_early(const char *buf, size_t len, size_t from,
                       struct gw_http_head *h);

/*
 * Parses a complete head of head_len bytes. The request-target may be in
 * origin-form ("/p?q"), absolute-form ("http://host/p?q": path and query
 * taken from it), or "*" (OPTIONS only). Returns 0, or the HTTP status
 * to answer with: 400 malformed (an invalid Host value too, "*" with
 * another method), 417 unknown expectation, 431
 * more than h->max_headers fields, 501 unknown transfer coding, 505
 * version not supported. A refused head's h->method_len is not 0 when
 * its method token was read whole (followed by its space); h->refusal
 * names the reason of every refusal but a malformed head's and 431.
 */
int gw_http_parse_head(const char *buf, size_t head_len,
                       struct gw_http_head *h);

/*
 * Dot-segments ("." and "..", also spelled with %2e) in a path that
 * starts with "/": 1 when there are some (resolve them), else 0.
 */
int gw_http_path_has_dots(const char *path, size_t len);

/*
 * Resolves the dot-segments of path (RFC 3986 5.2.4) into out (at least
 * len bytes); *out_len gets the result's length. Returns 0, or -1 when a
 * ".." would climb above the root.
 */
int gw_http_path_resolve(const char *path, size_t len, char *out,
                         size_t *out_len);

/* Case-insensitive lookup; NULL when absent. */
const struct gw_http_header *gw_http_find(const struct gw_http_head *h,
                                          const char *name, size_t len);

/* gw_http_find, and in the same pass how many fields are so named (*n). */
const struct gw_http_header *gw_http_find_count(const struct gw_http_head *h,
                                                const char *name, size_t len,
                                                size_t *n);

/* How many fields are named name (case-insensitive): 0, 1, or a repeat. */
size_t gw_http_count(const struct gw_http_head *h, const char *name,
                     size_t len);

struct gw_chunked {
    int      state;             /* decoder state; 0 at start */
    uint64_t remaining;         /* bytes left in the current chunk */
    size_t   in;                /* bytes of the raw body consumed */
    size_t   out;               /* bytes of decoded body written */
    size_t   line;              /* bytes of the current size/trailer line */
};

/*
 * Decodes a chunked body in place: raw bytes buf[st->in..len) are consumed
 * and decoded bytes written at buf[st->out..] (out never passes in).
 * Returns 1 when the body (and trailers) ended -- st->in is then the raw
 * length --, 0 when more bytes are needed, -1 when malformed.
 */
int gw_chunked_decode(struct gw_chunked *st, char *buf, size_t len);

#endif
