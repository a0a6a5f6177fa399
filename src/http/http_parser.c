/*
 * http_parser.c -- see http_parser.h. Strict where leniency lets requests
 * be smuggled: Content-Length with Transfer-Encoding, Content-Lengths that
 * differ, a transfer coding other than chunked, folded headers, a bare CR
 * or LF, controls in a value, a second Host are all refused. What it
 * accepts beyond the strict grammar is only what RFC 9112 and RFC 9110
 * allow a server: empty lines before the request line, a Content-Length
 * repeated with the same value, HTTP/1.x for x > 1 (answered as 1.1),
 * whitespace before a chunk extension.
 */
#include <stddef.h>
#include <string.h>

#include "http_parser.h"

/* RFC 9110 tchar. */
static const unsigned char tchar[256] = {
    ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1,
    ['*'] = 1, ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1,
    ['`'] = 1, ['|'] = 1, ['~'] = 1,
    ['0'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['4'] = 1, ['5'] = 1,
    ['6'] = 1, ['7'] = 1, ['8'] = 1, ['9'] = 1,
    ['A'] = 1, ['B'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['F'] = 1,
    ['G'] = 1, ['H'] = 1, ['I'] = 1, ['J'] = 1, ['K'] = 1, ['L'] = 1,
    ['M'] = 1, ['N'] = 1, ['O'] = 1, ['P'] = 1, ['Q'] = 1, ['R'] = 1,
    ['S'] = 1, ['T'] = 1, ['U'] = 1, ['V'] = 1, ['W'] = 1, ['X'] = 1,
    ['Y'] = 1, ['Z'] = 1,
    ['a'] = 1, ['b'] = 1, ['c'] = 1, ['d'] = 1, ['e'] = 1, ['f'] = 1,
    ['g'] = 1, ['h'] = 1, ['i'] = 1, ['j'] = 1, ['k'] = 1, ['l'] = 1,
    ['m'] = 1, ['n'] = 1, ['o'] = 1, ['p'] = 1, ['q'] = 1, ['r'] = 1,
    ['s'] = 1, ['t'] = 1, ['u'] = 1, ['v'] = 1, ['w'] = 1, ['x'] = 1,
    ['y'] = 1, ['z'] = 1,
};

size_t
gw_http_head_end(const char *buf, size_t len, size_t *scanned)
{
    size_t i = *scanned > 3 ? *scanned - 3 : 0;

    for (; i + 3 < len; i++) {
        const char *p = memchr(buf + i, '\r', len - 3 - i);

        if (p == NULL) {
            break;
        }
        i = (size_t) (p - buf);
        if (p[1] == '\n' && p[2] == '\r' && p[3] == '\n') {
            *scanned = i + 4;
            return i + 4;
        }
    }
    *scanned = len;
    return 0;
}

static int
ieq(const char *a, size_t alen, const char *lower, size_t llen)
{
    if (alen != llen) {
        return 0;
    }
    for (size_t i = 0; i < alen; i++) {
        unsigned char c = (unsigned char) a[i];

        if (c >= 'A' && c <= 'Z') {
            c = (unsigned char) (c + 32);
        }
        if (c != (unsigned char) lower[i]) {
            return 0;
        }
    }
    return 1;
}

const struct gw_http_header *
gw_http_find(const struct gw_http_head *h, const char *name, size_t len)
{
    for (size_t i = 0; i < h->nheaders; i++) {
        const struct gw_http_header *x = &h->headers[i];

        if (x->name_len == len) {
            size_t j = 0;

            for (; j < len; j++) {
                unsigned char a = (unsigned char) x->name[j];
                unsigned char b = (unsigned char) name[j];

                if (a >= 'A' && a <= 'Z') {
                    a = (unsigned char) (a + 32);
                }
                if (b >= 'A' && b <= 'Z') {
                    b = (unsigned char) (b + 32);
                }
                if (a != b) {
                    break;
                }
            }
            if (j == len) {
                return x;
            }
        }
    }
    return NULL;
}

/* Walks a comma-separated token list; calls back per trimmed token. */
static void
each_token(const char *v, size_t len, void (*fn)(void *, const char *,
           size_t), void *arg)
{
    size_t i = 0;

    while (i < len) {
        size_t start, end;

        while (i < len && (v[i] == ' ' || v[i] == '\t' || v[i] == ',')) {
            i++;
        }
        start = i;
        while (i < len && v[i] != ',') {
            i++;
        }
        end = i;
        while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t')) {
            end--;
        }
        if (end > start) {
            fn(arg, v + start, end - start);
        }
    }
}

struct conn_flags {
    int close;
    int keep_alive;
};

static void
conn_token(void *arg, const char *t, size_t len)
{
    struct conn_flags *f = arg;

    if (ieq(t, len, "close", 5)) {
        f->close = 1;
    } else if (ieq(t, len, "keep-alive", 10)) {
        f->keep_alive = 1;
    }
}

int
gw_http_parse_head(const char *buf, size_t head_len, struct gw_http_head *h)
{
    const char *p = buf, *end = buf + head_len, *eol;
    const char *target;
    size_t target_len;
    struct conn_flags cf = { 0, 0 };
    int te_seen = 0, host_seen = 0;

    /* everything but the big headers array, which nheaders bounds */
    memset(h, 0, offsetof(struct gw_http_head, headers));
    h->content_length = -1;
    h->chunked = 0;
    h->keep_alive = 0;
    h->expect_continue = 0;

    /* RFC 9112 2.2: ignore at least one empty line before the request. */
    while (end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
        p += 2;
    }

    /* method */
    h->method = p;
    while (p < end && tchar[(unsigned char) *p]) {
        p++;
    }
    h->method_len = (size_t) (p - h->method);
    if (h->method_len == 0 || h->method_len > 20 || p >= end || *p != ' ') {
        return 400;
    }
    p++;

    /* request-target: origin-form (or "*" for OPTIONS) */
    target = p;
    while (p < end && (unsigned char) *p > 0x20 && *p != 0x7f) {
        p++;
    }
    target_len = (size_t) (p - target);
    if (target_len == 0 || p >= end || *p != ' ') {
        return 400;
    }
    if (target[0] != '/' && !(target_len == 1 && target[0] == '*')) {
        return 400;
    }
    p++;
    h->path = target;
    {
        const char *q = memchr(target, '?', target_len);

        if (q != NULL) {
            h->path_len = (size_t) (q - target);
            h->query = q + 1;
            h->query_len = target_len - h->path_len - 1;
        } else {
            h->path_len = target_len;
        }
    }

    /* version */
    if (end - p < 10 || memcmp(p, "HTTP/", 5) != 0) {
        return 400;
    }
    if (p[5] < '0' || p[5] > '9' || p[6] != '.' || p[7] < '0' || p[7] > '9'
        || p[8] != '\r' || p[9] != '\n') {
        return 400;
    }
    if (p[5] != '1') {
        return 505;
    }
    h->minor = p[7] - '0';
    if (h->minor > 1) {
        h->minor = 1;   /* HTTP/1.2+ is answered as 1.1 (RFC 9110 2.5) */
    }
    p += 10;

    /* header fields, up to the blank line that ends the head */
    while (p < end) {
        struct gw_http_header *x;
        const char *colon, *v, *ve;

        if (end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
            p += 2;
            break;
        }
        if (*p == ' ' || *p == '\t') {
            return 400;             /* obs-fold */
        }
        eol = memchr(p, '\n', (size_t) (end - p));
        if (eol == NULL || eol == p || eol[-1] != '\r') {
            return 400;
        }
        colon = p;
        while (colon < eol && tchar[(unsigned char) *colon]) {
            colon++;
        }
        if (colon == p || *colon != ':') {
            return 400;             /* empty name or space before colon */
        }
        if (h->nheaders == GW_HTTP_MAX_HEADERS) {
            return 431;
        }
        v = colon + 1;
        ve = eol - 1;               /* at '\r' */
        while (v < ve && (*v == ' ' || *v == '\t')) {
            v++;
        }
        while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) {
            ve--;
        }
        for (const char *c = v; c < ve; c++) {
            unsigned char u = (unsigned char) *c;

            if ((u < 0x20 && u != '\t') || u == 0x7f) {
                return 400;         /* bare CR, NUL, other controls */
            }
        }
        x = &h->headers[h->nheaders++];
        x->name = p;
        x->name_len = (size_t) (colon - p);
        x->value = v;
        x->value_len = (size_t) (ve - v);

        if (ieq(x->name, x->name_len, "content-length", 14)) {
            int64_t n = 0;

            if (x->value_len == 0 || x->value_len > 15) {
                return 400;
            }
            for (size_t i = 0; i < x->value_len; i++) {
                if (x->value[i] < '0' || x->value[i] > '9') {
                    return 400;
                }
                n = n * 10 + (x->value[i] - '0');
            }
            if (h->content_length >= 0 && h->content_length != n) {
                return 400;
            }
            h->content_length = n;
        } else if (ieq(x->name, x->name_len, "transfer-encoding", 17)) {
            if (te_seen || !ieq(x->value, x->value_len, "chunked", 7)) {
                return 501;
            }
            te_seen = 1;
            h->chunked = 1;
        } else if (ieq(x->name, x->name_len, "connection", 10)) {
            each_token(x->value, x->value_len, conn_token, &cf);
        } else if (ieq(x->name, x->name_len, "expect", 6)) {
            if (!ieq(x->value, x->value_len, "100-continue", 12)) {
                return 417;
            }
            h->expect_continue = 1;
        } else if (ieq(x->name, x->name_len, "host", 4)) {
            if (host_seen) {
                return 400;
            }
            host_seen = 1;
        }
        p = eol + 1;
    }
    if (h->chunked && (h->content_length >= 0 || h->minor == 0)) {
        return 400;                 /* request smuggling shapes */
    }
    if (h->minor == 1 && !host_seen) {
        return 400;
    }
    h->keep_alive = h->minor == 1 ? !cf.close : (cf.keep_alive && !cf.close);
    return 0;
}

enum {
    CH_SIZE = 0,    /* hex digits */
    CH_EXT,         /* chunk extension, skipped, until CR */
    CH_SIZE_LF,     /* LF after the size line */
    CH_DATA,
    CH_DATA_CR,
    CH_DATA_LF,
    CH_TRAILER,     /* trailer line (or the final empty line) */
    CH_TRAILER_LF
};

#define CH_MAX_LINE 4096    /* bytes in a size or trailer line */

static int
hexval(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    c = (unsigned char) (c | 0x20);
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

int
gw_chunked_decode(struct gw_chunked *st, char *buf, size_t len)
{
    while (st->in < len) {
        unsigned char c = (unsigned char) buf[st->in];

        switch (st->state) {
        case CH_SIZE: {
            int v = hexval(c);

            if (v >= 0) {
                if (st->line >= 15) {
                    return -1;      /* 60 bits of size is plenty */
                }
                st->remaining = (st->remaining << 4) | (uint64_t) v;
                st->line++;
                st->in++;
                break;
            }
            if (st->line == 0) {
                return -1;
            }
            if (c == ';' || c == ' ' || c == '\t') {
                st->state = CH_EXT;
            } else if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else {
                return -1;
            }
            st->in++;
            break;
        }
        case CH_EXT:
            if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else if (c == '\n' || ++st->line > CH_MAX_LINE) {
                return -1;
            }
            st->in++;
            break;
        case CH_SIZE_LF:
            if (c != '\n') {
                return -1;
            }
            st->in++;
            st->line = 0;
            st->state = st->remaining == 0 ? CH_TRAILER : CH_DATA;
            break;
        case CH_DATA: {
            size_t avail = len - st->in;
            size_t n = st->remaining < avail ? (size_t) st->remaining : avail;

            memmove(buf + st->out, buf + st->in, n);
            st->out += n;
            st->in += n;
            st->remaining -= n;
            if (st->remaining == 0) {
                st->state = CH_DATA_CR;
            }
            break;
        }
        case CH_DATA_CR:
            if (c != '\r') {
                return -1;
            }
            st->in++;
            st->state = CH_DATA_LF;
            break;
        case CH_DATA_LF:
            if (c != '\n') {
                return -1;
            }
            st->in++;
            st->state = CH_SIZE;
            st->line = 0;
            st->remaining = 0;
            break;
        case CH_TRAILER:
            /* Trailer fields are read and dropped; the empty line ends. */
            if (c == '\r') {
                st->state = CH_TRAILER_LF;
            } else if (c == '\n' || ++st->line > CH_MAX_LINE) {
                return -1;
            }
            st->in++;
            break;
        case CH_TRAILER_LF:
            if (c != '\n') {
                return -1;
            }
            st->in++;
            if (st->line == 0) {
                return 1;
            }
            st->line = 0;
            st->state = CH_TRAILER;
            break;
        default:
            return -1;
        }
    }
    return 0;
}
