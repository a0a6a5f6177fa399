/*
 * http_response.c -- writing responses into a connection's output buffer:
 * status line, headers, body, and the server's own JSON error answers.
 * Nothing here sends: the connection flushes its buffer (http_server.c),
 * so the responses of pipelined requests go out together.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "http_conn.h"
#include "log.h"
#include "loop.h"

/*
 * The status line for each code, indexed by code, so the hot path copies
 * one string. Reason phrases are the IANA HTTP Status Code Registry's
 * (RFC 9110 and the later registrations). Two registry rows carry no
 * phrase: 306 ("(Unused)") is sent like an unregistered code, and 418,
 * reserved there as "(Unused)" because RFC 2324's joke made it unusable,
 * gets RFC 2324's own phrase, "I'm a teapot", which clients that know 418
 * expect. Any other code gets an EMPTY reason phrase ("HTTP/1.1 299 \r\n"):
 * RFC 9112 section 4 allows it (the space stays), and it claims nothing
 * about a code we do not know.
 */
struct status_line {
    const char *line;           /* "HTTP/1.1 200 OK\r\n"; static */
    size_t      len;            /* bytes of line */
};

#define STATUS(code, reason)                                            \
    [code] = { "HTTP/1.1 " #code " " reason "\r\n",                     \
               sizeof("HTTP/1.1 " #code " " reason "\r\n") - 1 }

static const struct status_line status_lines[600] = {
    STATUS(100, "Continue"),
    STATUS(101, "Switching Protocols"),
    STATUS(102, "Processing"),
    STATUS(103, "Early Hints"),
    STATUS(104, "Upload Resumption Supported"),   /* provisional */
    STATUS(200, "OK"),
    STATUS(201, "Created"),
    STATUS(202, "Accepted"),
    STATUS(203, "Non-Authoritative Information"),
    STATUS(204, "No Content"),
    STATUS(205, "Reset Content"),
    STATUS(206, "Partial Content"),
    STATUS(207, "Multi-Status"),
    STATUS(208, "Already Reported"),
    STATUS(226, "IM Used"),
    STATUS(300, "Multiple Choices"),
    STATUS(301, "Moved Permanently"),
    STATUS(302, "Found"),
    STATUS(303, "See Other"),
    STATUS(304, "Not Modified"),
    STATUS(305, "Use Proxy"),
    STATUS(307, "Temporary Redirect"),
    STATUS(308, "Permanent Redirect"),
    STATUS(400, "Bad Request"),
    STATUS(401, "Unauthorized"),
    STATUS(402, "Payment Required"),
    STATUS(403, "Forbidden"),
    STATUS(404, "Not Found"),
    STATUS(405, "Method Not Allowed"),
    STATUS(406, "Not Acceptable"),
    STATUS(407, "Proxy Authentication Required"),
    STATUS(408, "Request Timeout"),
    STATUS(409, "Conflict"),
    STATUS(410, "Gone"),
    STATUS(411, "Length Required"),
    STATUS(412, "Precondition Failed"),
    STATUS(413, "Content Too Large"),
    STATUS(414, "URI Too Long"),
    STATUS(415, "Unsupported Media Type"),
    STATUS(416, "Range Not Satisfiable"),
    STATUS(417, "Expectation Failed"),
    STATUS(418, "I'm a teapot"),
    STATUS(421, "Misdirected Request"),
    STATUS(422, "Unprocessable Content"),
    STATUS(423, "Locked"),
    STATUS(424, "Failed Dependency"),
    STATUS(425, "Too Early"),
    STATUS(426, "Upgrade Required"),
    STATUS(428, "Precondition Required"),
    STATUS(429, "Too Many Requests"),
    STATUS(431, "Request Header Fields Too Large"),
    STATUS(451, "Unavailable For Legal Reasons"),
    STATUS(500, "Internal Server Error"),
    STATUS(501, "Not Implemented"),
    STATUS(502, "Bad Gateway"),
    STATUS(503, "Service Unavailable"),
    STATUS(504, "Gateway Timeout"),
    STATUS(505, "HTTP Version Not Supported"),
    STATUS(506, "Variant Also Negotiates"),
    STATUS(507, "Insufficient Storage"),
    STATUS(508, "Loop Detected"),
    STATUS(510, "Not Extended"),                  /* obsoleted */
    STATUS(511, "Network Authentication Required"),
};

#undef STATUS

static char   date_buf[64];     /* "Date: ...\r\n" */
static size_t date_len;         /* bytes of date_buf */
static time_t date_at;          /* s (wall) date_buf was made for */

/* The Date header line, remade at most once a second. */
static const char *
date_line(size_t *len)
{
    time_t now = (time_t) gw_loop_now();

    if (now != date_at) {
        struct tm tm;

        gmtime_r(&now, &tm);
        date_len = strftime(date_buf, sizeof(date_buf),
                            "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
        date_at = now;
    }
    *len = date_len;
    return date_buf;
}

/* Makes room for more bytes in c->out. GW_OK or GW_ERR (no memory). */
static int
out_reserve(struct gw_conn *c, size_t more)
{
    size_t need = c->out_len + more;
    size_t cap = c->out_cap ? c->out_cap : 4096;
    char *p;

    if (need <= c->out_cap) {
        return GW_OK;
    }
    while (cap < need) {
        cap *= 2;
    }
    p = realloc(c->out, cap);
    if (p == NULL) {
        return GW_ERR;
    }
    c->out = p;
    c->out_cap = cap;
    return GW_OK;
}

/* Appends n bytes; out_reserve() made room. */
static void
out_add(struct gw_conn *c, const char *s, size_t n)
{
    memcpy(c->out + c->out_len, s, n);
    c->out_len += n;
}

/* Appends v in decimal; out_reserve() made room (20 bytes). */
static void
out_uint(struct gw_conn *c, size_t v)
{
    char tmp[24];
    size_t n = sizeof(tmp);

    do {
        tmp[--n] = (char) ('0' + v % 10);
        v /= 10;
    } while (v != 0);
    out_add(c, tmp + n, sizeof(tmp) - n);
}

/* No printf: this is the hot path. */
int
gw_resp_write(struct gw_conn *c, int status, const char *ctype,
              int own_date, const char *extra, size_t extra_len,
              const char *body, size_t body_len)
{
    const struct status_line *sl = NULL;
    size_t ctype_len = ctype != NULL ? strlen(ctype) : 0;
    size_t date_n = 0;
    const char *date = own_date ? NULL : date_line(&date_n);
    int no_body = 0;
    int head_only = c->head.method_len == 4
                    && memcmp(c->head.method, "HEAD", 4) == 0;

    if (status >= 100 && status < 600 && status_lines[status].line != NULL) {
        sl = &status_lines[status];
    }
    if (status == 204 || status == 304 || (status >= 100 && status < 200)) {
        no_body = 1;
        body_len = 0;
    }
    if (!c->head.keep_alive || gw_srv.draining
        || c->requests + 1 >= gw_srv.conf.keepalive_requests) {
        c->close_after = 1;
    }
    if (out_reserve(c, 200 + date_n + ctype_len + 16 + sizeof(c->request_id)
                    + extra_len + body_len) != GW_OK) {
        return GW_ERR;
    }
    if (sl != NULL) {
        out_add(c, sl->line, sl->len);
    } else {
        out_add(c, "HTTP/1.1 ", 9);
        out_uint(c, (size_t) (status > 0 ? status : 0));
        out_add(c, " \r\n", 3);     /* empty reason phrase: see above */
    }
    if (date != NULL) {
        out_add(c, date, date_n);
    }
    if (ctype != NULL && !no_body) {
        out_add(c, "Content-Type: ", 14);
        out_add(c, ctype, ctype_len);
        out_add(c, "\r\n", 2);
    }
    if (!no_body) {
        out_add(c, "Content-Length: ", 16);
        out_uint(c, body_len);
        out_add(c, "\r\n", 2);
    }
    if (c->close_after) {
        out_add(c, "Connection: close\r\n", 19);
    } else if (c->head.minor == 0) {
        out_add(c, "Connection: keep-alive\r\n", 24);
    }
    /* the id of the request's log lines, on every answer to a request
     * (one refused before its handler has none: conn_bad clears it) */
    if (c->request_id[0] != '\0') {
        out_add(c, "X-Request-Id: ", 14);
        out_add(c, c->request_id, strlen(c->request_id));
        out_add(c, "\r\n", 2);
    }
    if (extra != NULL) {
        out_add(c, extra, extra_len);
    }
    out_add(c, "\r\n", 2);
    if (body_len > 0 && !head_only) {
        out_add(c, body, body_len);
    }
    return GW_OK;
}

#define ERR_KIND_MAX 63         /* bytes of kind kept */
#define ERR_MSG_MAX  255        /* bytes of message kept */

/* The body is JSON-quoted with core's gw_json_quote(), the one routine
 * (the log lines use it too): any bytes a handler gave become valid JSON
 * (invalid UTF-8 as U+FFFD). */
void
gw_resp_error(struct gw_conn *c, int status, const char *kind,
              const char *message)
{
    /* 6 bytes per input byte at worst (\u00XX), plus the frame */
    char body[6 * (ERR_KIND_MAX + ERR_MSG_MAX + sizeof(c->request_id))
              + 64];
    size_t n = 0, q;

    memcpy(body, "{\"error\":", 9);
    n += 9;
    q = gw_json_quote(body + n, sizeof(body) - n, kind,
                      strnlen(kind, ERR_KIND_MAX));
    n += q;
    memcpy(body + n, ",\"message\":", 11);
    n += 11;
    q = gw_json_quote(body + n, sizeof(body) - n, message,
                      strnlen(message, ERR_MSG_MAX));
    n += q;
    if (c->request_id[0] != '\0') {
        memcpy(body + n, ",\"request_id\":", 14);
        n += 14;
        q = gw_json_quote(body + n, sizeof(body) - n, c->request_id,
                          strlen(c->request_id));
        n += q;
    }
    body[n++] = '}';
    if (gw_resp_write(c, status, "application/json", 0, NULL, 0, body, n)
        != GW_OK) {
        c->close_after = 1;
    }
}

void
gw_resp_continue(struct gw_conn *c)
{
    static const char line[] = "HTTP/1.1 100 Continue\r\n\r\n";

    if (out_reserve(c, sizeof(line) - 1) == GW_OK) {
        out_add(c, line, sizeof(line) - 1);
    }
}
