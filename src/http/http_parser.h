/*
 * http_parser.h -- an HTTP/1.1 request parser that never copies: every
 * field points into the caller's buffer. Pure functions, no I/O: fuzzed by
 * fuzz/fuzz_http_parser.c.
 */
#ifndef GW_HTTP_PARSER_H
#define GW_HTTP_PARSER_H

#include <stddef.h>
#include <stdint.h>

#define GW_HTTP_MAX_HEADERS 100

struct gw_http_header {
    const char *name;           /* into the buffer; not NUL-terminated */
    size_t      name_len;       /* bytes */
    const char *value;          /* into the buffer; OWS trimmed */
    size_t      value_len;      /* bytes */
};

struct gw_http_head {
    const char *method;         /* into the buffer */
    size_t      method_len;     /* bytes; 1..20 */
    const char *path;           /* into the buffer: target up to '?' */
    size_t      path_len;       /* bytes */
    const char *query;          /* into the buffer: after '?', or NULL */
    size_t      query_len;      /* bytes */
    int         minor;          /* HTTP/1.<minor>: 0 or 1 */
    size_t      nheaders;       /* entries of headers in use */
    struct gw_http_header headers[GW_HTTP_MAX_HEADERS]; /* in order */
    int64_t     content_length; /* bytes, or -1 when absent */
    int         chunked;        /* Transfer-Encoding: chunked */
    int         keep_alive;     /* connection persists after this one */
    int         expect_continue;/* Expect: 100-continue */
};

/*
 * Finds the end of the head in buf[0..len), resuming from *scanned (bytes
 * already searched, updated). Returns the head length including the blank
 * line, or 0 when it is not complete yet.
 */
size_t gw_http_head_end(const char *buf, size_t len, size_t *scanned);

/*
 * Parses a complete head of head_len bytes. Returns 0, or the HTTP status
 * to answer with: 400 malformed, 417 unknown expectation, 431 more than
 * GW_HTTP_MAX_HEADERS fields, 501 unknown transfer coding, 505 version
 * not supported.
 */
int gw_http_parse_head(const char *buf, size_t head_len,
                       struct gw_http_head *h);

/* Case-insensitive lookup; NULL when absent. */
const struct gw_http_header *gw_http_find(const struct gw_http_head *h,
                                          const char *name, size_t len);

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
