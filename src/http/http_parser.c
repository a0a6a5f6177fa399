/*
 * http_parser.c -- see http_parser.h. Strict where leniency lets requests
 * be smuggled: Content-Length with Transfer-Encoding, Content-Lengths that
 * differ, a transfer coding other than chunked, folded headers, a bare CR
 * or LF, controls in a value, a second Host, a chunked trailer line that
 * is no field line are all refused. What it
 * accepts beyond the strict grammar is only what RFC 9112 and RFC 9110
 * allow a server: empty lines before the request line, a Content-Length
 * repeated with the same value, HTTP/1.x for x > 1 (answered as 1.1),
 * whitespace before a chunk extension, an absolute-form target.
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
    size_t i = *scanned > 3 ? *scanned - 3 : 0, lead = 0;

    /* empty lines before the request line are not the end of a head
     * (RFC 9112 2.2; gw_http_parse_head skips them): "\r\n\r\nGET ..."
     * would end at byte 4 with no request line in it */
    while (lead + 1 < len && buf[lead] == '\r' && buf[lead + 1] == '\n') {
        lead += 2;
    }
    if (i < lead) {
        i = lead;
    }
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

size_t
gw_http_count_fields(const char *buf, size_t head_len)
{
    size_t n = 0;
    const char *p = buf, *end = buf + head_len;

    for (;;) {
        const char *q = memchr(p, '\n', (size_t) (end - p));

        if (q == NULL) {
            break;
        }
        n++;
        p = q + 1;
    }
    return n > 0 ? n - 1 : 0;
}

static int request_line(const char **pp, const char *end,
                        struct gw_http_head *h);

/* A complete header line [p, eol] (eol at its LF, CR before it) that the
 * full parse would refuse: 400, else 0. */
static int
header_line_bad(const char *p, const char *eol)
{
    const char *c = p;

    if (*p == ' ' || *p == '\t') {
        return 400;                 /* obs-fold */
    }
    while (c < eol && tchar[(unsigned char) *c]) {
        c++;
    }
    if (c == p || *c != ':') {
        return 400;                 /* empty name or space before colon */
    }
    for (c++; c < eol - 1; c++) {
        unsigned char u = (unsigned char) *c;

        if ((u < 0x20 && u != '\t') || u == 0x7f) {
            return 400;             /* NUL, other controls */
        }
    }
    return 0;
}

size_t
gw_http_method_of(const char *buf, size_t len, size_t *at)
{
    size_t i = 0, m;

    while (i + 1 < len && buf[i] == '\r' && buf[i + 1] == '\n') {
        i += 2;
    }
    for (m = 0; m < 20 && i + m < len && tchar[(unsigned char) buf[i + m]];
         m++) {
    }
    if (m == 0 || i + m >= len || buf[i + m] != ' ') {
        return 0;
    }
    *at = i;
    return m;
}

int
gw_http_head_early(const char *buf, size_t len, size_t from,
                   struct gw_http_head *h)
{
    size_t i = 0, m, line0, ls;
    struct gw_http_head line;
    int rc = 400;

    /* every result; the caller's headers and max_headers stay */
    memset(h, 0, offsetof(struct gw_http_head, headers));
    /* empty lines before the request line (RFC 9112 2.2) */
    while (i < len && buf[i] == '\r') {
        if (i + 1 < len && buf[i + 1] != '\n') {
            return 400;
        }
        i += 2;
    }
    if (i >= len) {
        return 0;
    }
    line0 = i;
    for (m = 0; i + m < len && tchar[(unsigned char) buf[i + m]]; m++) {
        if (m == 20) {
            return 400;             /* no method is that long */
        }
    }
    if (i + m < len && (m == 0 || buf[i + m] != ' ')) {
        return 400;                 /* cannot start a request line */
    }
    if (i + m == len) {
        m = 0;                      /* the method is not whole yet */
    }
    if (from < line0) {
        from = line0;
    }
    /* the lines that ended in the bytes from `from` on (those before
     * passed already), from the start of the line holding `from` */
    ls = from;
    while (ls > line0 && buf[ls - 1] != '\n') {
        ls--;
    }
    for (i = from; i < len; i++) {
        const char *q = memchr(buf + i, '\n', len - i), *cr;

        if (memchr(buf + i, '\0', (q != NULL ? (size_t) (q - buf) + 1 : len)
                   - i) != NULL) {
            goto refuse;            /* a NUL is in no valid head */
        }
        cr = memchr(buf + i, '\r', (q != NULL ? (size_t) (q - buf) : len) - i);
        if (cr != NULL && (size_t) (cr - buf) + 1 < len && cr[1] != '\n') {
            goto refuse;            /* a bare CR */
        }
        if (q == NULL) {
            break;
        }
        i = (size_t) (q - buf);
        if (i == 0 || buf[i - 1] != '\r') {
            goto refuse;            /* a bare LF ends no line */
        }
        /* a complete line [ls, i]: refused now if the full parse would
         * refuse it (the blank line that ends the head is not seen here:
         * the caller has the whole head then) */
        if (ls == line0) {
            const char *p = buf + ls;

            memset(&line, 0, sizeof(line));
            rc = request_line(&p, buf + i + 1, &line);
            if (rc != 0) {
                h->refusal = line.refusal;
                goto refuse;
            }
            rc = 400;
        } else if (i - ls > 1 && header_line_bad(buf + ls, buf + i) != 0) {
            goto refuse;
        }
        ls = i + 1;
    }
    return 0;
refuse:
    /* its method when read whole (followed by its space), as the full
     * parse knows it: the same request split otherwise is told the same */
    if (m > 0) {
        h->method = buf + line0;
        h->method_len = m;
    }
    return rc;
}

/* A dot-segment: 1 ".", 2 "..", 0 neither (also %2e, any case). */
static int
dots(const char *s, size_t n)
{
    int d = 0;

    for (size_t i = 0; i < n; d++) {
        if (s[i] == '.') {
            i++;
        } else if (n - i >= 3 && s[i] == '%' && s[i + 1] == '2'
                   && (s[i + 2] == 'e' || s[i + 2] == 'E')) {
            i += 3;
        } else {
            return 0;
        }
        if (d == 2) {
            return 0;
        }
    }
    return d;
}

int
gw_http_path_has_dots(const char *path, size_t len)
{
    size_t i = 0;

    while (i < len) {
        size_t j = i + 1;

        while (j < len && path[j] != '/') {
            j++;
        }
        if (dots(path + i + 1, j - i - 1) != 0) {
            return 1;
        }
        i = j;
    }
    return 0;
}

int
gw_http_path_resolve(const char *path, size_t len, char *out,
                     size_t *out_len)
{
    size_t i = 0, o = 0;

    while (i < len) {
        size_t j = i + 1;       /* path[i] is '/' */
        int d;

        while (j < len && path[j] != '/') {
            j++;
        }
        d = dots(path + i + 1, j - i - 1);
        if (d == 2) {
            if (o == 0) {
                return -1;      /* above the root */
            }
            while (out[o - 1] != '/') {
                o--;
            }
            o--;                /* and its '/' */
        } else if (d == 0) {
            memcpy(out + o, path + i, j - i);
            o += j - i;
        }
        if (d != 0 && j == len) {
            out[o++] = '/';     /* "/a/." and "/a/b/.." end in "/" */
        }
        i = j;
    }
    if (o == 0) {
        out[o++] = '/';
    }
    *out_len = o;
    return 0;
}

/* RFC 9110 7.2 / RFC 3986 3.2.2: uri-host [ ":" port ], or empty. */
static int
host_valid(const char *v, size_t len)
{
    size_t i = 0;

    if (len > 0 && v[0] == '[') {
        for (i = 1; i < len && v[i] != ']'; i++) {
            unsigned char u = (unsigned char) v[i];

            if (!((u >= '0' && u <= '9') || ((u | 0x20) >= 'a'
                  && (u | 0x20) <= 'z') || u == ':' || u == '.'
                  || u == '%' || u == '-' || u == '_' || u == '~')) {
                return 0;
            }
        }
        if (i == len || i == 1) {
            return 0;
        }
        i++;
    } else {
        for (; i < len && v[i] != ':'; i++) {
            unsigned char u = (unsigned char) v[i];

            if (u >= 0x80 || !(tchar[u] || u == '(' || u == ')'
                               || u == ',' || u == ';' || u == '=')
                || u == '^' || u == '`' || u == '|' || u == '#') {
                return 0;       /* unreserved, pct-encoded, sub-delims */
            }
        }
    }
    if (i < len) {
        if (v[i] != ':') {
            return 0;
        }
        for (i++; i < len; i++) {
            if (v[i] < '0' || v[i] > '9') {
                return 0;
            }
        }
    }
    return 1;
}

/* "http://" or "https://" (any case) at t: its length, or 0. */
static size_t
http_scheme(const char *t, size_t len)
{
    static const char *s[] = { "http://", "https://" };

    for (int k = 0; k < 2; k++) {
        size_t n = strlen(s[k]), i;

        if (len < n) {
            continue;
        }
        for (i = 0; i < n; i++) {
            if ((t[i] | (t[i] >= 'A' && t[i] <= 'Z' ? 0x20 : 0)) != s[k][i]) {
                break;
            }
        }
        if (i == n) {
            return n;
        }
    }
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

/* 1 when field x is named name (ASCII case-insensitive) */
static int
name_is(const struct gw_http_header *x, const char *name, size_t len)
{
    size_t j = 0;

    if (x->name_len != len) {
        return 0;
    }
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
            return 0;
        }
    }
    return 1;
}

size_t
gw_http_count(const struct gw_http_head *h, const char *name, size_t len)
{
    size_t n = 0;

    for (size_t i = 0; i < h->nheaders; i++) {
        n += (size_t) name_is(&h->headers[i], name, len);
    }
    return n;
}

const struct gw_http_header *
gw_http_find(const struct gw_http_head *h, const char *name, size_t len)
{
    for (size_t i = 0; i < h->nheaders; i++) {
        const struct gw_http_header *x = &h->headers[i];

        if (name_is(x, name, len)) {
            return x;
        }
    }
    return NULL;
}

const struct gw_http_header *
gw_http_find_count(const struct gw_http_head *h, const char *name, size_t len,
                   size_t *n)
{
    const struct gw_http_header *first = NULL;

    *n = 0;
    for (size_t i = 0; i < h->nheaders; i++) {
        const struct gw_http_header *x = &h->headers[i];

        if (name_is(x, name, len)) {
            if (first == NULL) {
                first = x;
            }
            (*n)++;
        }
    }
    return first;
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

/* The transfer codings of a request, over all its Transfer-Encoding
 * lines in order (RFC 9112 6.1, 6.3): whether the last one so far is
 * chunked, whether one is another coding, and whether chunked came before
 * another (before chunked again: twice). chunked not the final coding
 * (after another, or absent) makes the body's length unknowable: 400, a
 * MUST (6.3); another coding before a final chunked is one not
 * implemented: 501 (6.1). */
struct te_state {
    int last_chunked;
    int other;
    int not_final;
    int twice;
};

static void
te_token(void *arg, const char *t, size_t len)
{
    struct te_state *s = arg;

    if (s->last_chunked) {
        s->not_final = 1;
    }
    if (s->last_chunked && ieq(t, len, "chunked", 7)) {
        s->twice = 1;
    }
    s->last_chunked = ieq(t, len, "chunked", 7);
    if (!s->last_chunked) {
        s->other = 1;
    }
}

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

/* The request line at *pp (its CRLF before end): method, target and
 * version into h, *pp past its CRLF. 0, or the status that refuses it
 * (400, 505). */
static int
request_line(const char **pp, const char *end, struct gw_http_head *h)
{
    const char *p = *pp;
    const char *target;
    size_t target_len;

    /* method: known (method_len) only when read whole */
    h->method = p;
    while (p < end && tchar[(unsigned char) *p]) {
        p++;
    }
    if (p == h->method || p - h->method > 20 || p >= end || *p != ' ') {
        return 400;
    }
    h->method_len = (size_t) (p - h->method);
    p++;

    /* request-target: origin-form, absolute-form, or "*" (OPTIONS). A
     * fragment ('#') is no part of any (RFC 9112 3.2: a client leaves it
     * out): the scan stops there, and the line is refused below */
    target = p;
    while (p < end && (unsigned char) *p > 0x20 && *p != 0x7f && *p != '#') {
        p++;
    }
    target_len = (size_t) (p - target);
    if (target_len == 0 || p >= end || *p != ' ') {
        return 400;
    }
    p++;
    h->target = target;
    h->target_len = target_len;
    if (target_len == 1 && target[0] == '*') {
        /* asterisk-form: OPTIONS only (RFC 9112 3.2.4); it names the
         * server, not a path, and the router matches it to no route */
        if (!(h->method_len == 7 && memcmp(h->method, "OPTIONS", 7) == 0)) {
            return 400;
        }
        h->path = target;
    } else if (target[0] == '/') {
        h->path = target;
    } else {
        /* absolute-form (RFC 9112 3.2.2): routed by its path; the
         * authority must be a valid host and carry no userinfo */
        size_t sl = http_scheme(target, target_len), a = sl;

        if (sl == 0) {
            return 400;
        }
        while (a < target_len && target[a] != '/' && target[a] != '?') {
            a++;
        }
        if (a == sl || memchr(target + sl, '@', a - sl) != NULL
            || !host_valid(target + sl, a - sl)) {
            return 400;
        }
        if (a == target_len || target[a] == '?') {
            h->path = "/";      /* an empty path is "/" */
            h->path_len = 1;
            h->path_outside = 1;
        } else {
            h->path = target + a;
        }
        target += a;
        target_len -= a;
    }
    {
        const char *q = memchr(target, '?', target_len);

        if (!h->path_outside) {
            h->path_len = q != NULL ? (size_t) (q - target) : target_len;
        }
        if (q != NULL) {
            h->query = q + 1;
            h->query_len = target_len - (size_t) (q - target) - 1;
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
        h->refusal = "HTTP version not supported";
        return 505;
    }
    h->minor = p[7] - '0';
    if (h->minor > 1) {
        h->minor = 1;   /* HTTP/1.2+ is answered as 1.1 (RFC 9110 2.5) */
    }
    p += 10;
    *pp = p;
    return 0;
}

int
gw_http_parse_head(const char *buf, size_t head_len, struct gw_http_head *h)
{
    const char *p = buf, *end = buf + head_len, *eol;
    struct conn_flags cf = { 0, 0 };
    int te_seen = 0, host_seen = 0, rc;
    struct te_state te = { 0, 0, 0, 0 };

    /* every result; the caller's headers and max_headers stay */
    memset(h, 0, offsetof(struct gw_http_head, headers));
    h->content_length = -1;

    /* RFC 9112 2.2: ignore at least one empty line before the request. */
    while (end - p >= 2 && p[0] == '\r' && p[1] == '\n') {
        p += 2;
    }

    rc = request_line(&p, end, h);
    if (rc != 0) {
        return rc;
    }

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
        if (h->nheaders == h->max_headers) {
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
                h->refusal = "conflicting Content-Length values";
                return 400;
            }
            h->content_length = n;
        } else if (ieq(x->name, x->name_len, "transfer-encoding", 17)) {
            struct te_state before = te;

            each_token(x->value, x->value_len, te_token, &te);
            if (te.not_final) {
                /* chunked, then another coding */
                h->refusal = te.twice ? "chunked applied more than once"
                             : "chunked not the final transfer coding";
                return 400;
            }
            if (te.last_chunked == before.last_chunked
                && te.other == before.other) {
                te.other = 1;   /* a line with no coding at all */
            }
            te_seen = 1;
        } else if (ieq(x->name, x->name_len, "connection", 10)) {
            each_token(x->value, x->value_len, conn_token, &cf);
        } else if (ieq(x->name, x->name_len, "expect", 6)) {
            if (!ieq(x->value, x->value_len, "100-continue", 12)) {
                h->refusal = "unsupported expectation";
                return 417;
            }
            h->expect_continue = 1;
        } else if (ieq(x->name, x->name_len, "host", 4)) {
            /* RFC 9112 3.2: a MUST */
            if (host_seen) {
                h->refusal = "more than one Host header";
                return 400;
            }
            if (!host_valid(x->value, x->value_len)) {
                h->refusal = "invalid Host header";
                return 400;
            }
            host_seen = 1;
        }
        p = eol + 1;
    }
    if (te_seen) {
        if (!te.last_chunked) {
            /* chunked not the final coding: 6.3 */
            h->refusal = "chunked not the final transfer coding";
            return 400;
        }
        if (te.other) {
            /* another coding before chunked: 6.1 */
            h->refusal = "unsupported transfer coding";
            return 501;
        }
        h->chunked = 1;         /* chunked, once, the last coding */
    }
    /* request smuggling shapes */
    if (h->chunked && h->content_length >= 0) {
        h->refusal = "both Content-Length and Transfer-Encoding";
        return 400;
    }
    if (h->chunked && h->minor == 0) {
        h->refusal = "Transfer-Encoding on HTTP/1.0";
        return 400;
    }
    if (h->minor == 1 && !host_seen) {
        h->refusal = "missing Host header";
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
    CH_TRAILER_LF,
    CH_BWS          /* whitespace after the size: then ';' or CR only */
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
                /* 60 bits of size is plenty; leading zeros are digits
                 * of no weight (1*HEXDIG: "0000000000000003" is 3), held
                 * to the line's length only */
                if ((st->remaining >> 56) != 0
                    || st->line >= CH_MAX_LINE) {
                    return -1;
                }
                st->remaining = (st->remaining << 4) | (uint64_t) v;
                st->line++;
                st->in++;
                break;
            }
            if (st->line == 0) {
                return -1;
            }
            if (c == ';') {
                st->state = CH_EXT;
            } else if (c == ' ' || c == '\t') {
                st->state = CH_BWS;     /* "3 4" is not a size */
            } else if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else {
                return -1;
            }
            st->in++;
            break;
        }
        case CH_BWS:
            if (c == ';') {
                st->state = CH_EXT;
            } else if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else if ((c != ' ' && c != '\t') || ++st->line > CH_MAX_LINE) {
                return -1;
            }
            st->in++;
            break;
        case CH_EXT:
            /* skipped, but only what a chunk-ext can hold: tokens,
             * quoted strings, '=', ';' and whitespace (no control bytes:
             * a front proxy may read those differently) */
            if (c == '\r') {
                st->state = CH_SIZE_LF;
            } else if ((c < 0x20 && c != '\t') || c == 0x7f
                       || ++st->line > CH_MAX_LINE) {
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
            /* Trailer fields are read and dropped; the empty line ends.
             * Each is a field line all the same (RFC 9112 7.1.2), held
             * to a head's rules (header_line_bad): a token, a colon, a
             * value without controls; no obs-fold. A line that is none
             * ("GET /x HTTP/1.1") a front proxy may read otherwise.
             * remaining (0 here) is 1 once the line's colon is in. */
            if (c == '\r') {
                if (st->line > 0 && st->remaining == 0) {
                    return -1;      /* no colon */
                }
                st->state = CH_TRAILER_LF;
            } else if (st->remaining == 0 && c == ':' && st->line > 0) {
                st->remaining = 1;
                st->line++;
            } else if ((st->remaining == 0 && !tchar[c])
                       || (st->remaining == 1
                           && ((c < 0x20 && c != '\t') || c == 0x7f))
                       || ++st->line > CH_MAX_LINE) {
                return -1;          /* obs-fold, a bad name, a control */
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
            st->remaining = 0;
            st->state = CH_TRAILER;
            break;
        default:
            return -1;
        }
    }
    return 0;
}
