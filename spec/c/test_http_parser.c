/*
 * test_http_parser.c -- the request parser's decisions, one assert each.
 */
#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http_parser.h"

#define MAX_FIELDS 100

static struct gw_http_head h;
static struct gw_http_header fields[MAX_FIELDS];

static int
parse(const char *s)
{
    size_t scanned = 0, end = gw_http_head_end(s, strlen(s), &scanned);

    if (end == 0) {
        return -1;
    }
    h.headers = fields;
    h.max_headers = MAX_FIELDS;
    return gw_http_parse_head(s, end, &h);
}

static int
eq(const char *p, size_t n, const char *want)
{
    return n == strlen(want) && memcmp(p, want, n) == 0;
}

static struct gw_http_head eh;  /* what the early check found */

/* The early check of an incomplete head s, from 0 */
static int
early(const char *s)
{
    eh.headers = fields;
    eh.max_headers = MAX_FIELDS;
    return gw_http_head_early(s, strlen(s), 0, &eh);
}

/* h's refusal is want */
static int
why(const struct gw_http_head *x, const char *want)
{
    return x->refusal != NULL && strcmp(x->refusal, want) == 0;
}

static void
test_head_end(void)
{
    const char *s = "GET / HTTP/1.1\r\nHost: a\r\n\r\nNEXT";
    size_t scanned = 0;

    /* fed byte by byte, the end is found exactly once, at the same place */
    for (size_t i = 1; i < strlen(s); i++) {
        size_t e = gw_http_head_end(s, i, &scanned);
        if (e != 0) {
            assert(e == strlen(s) - 4);
            assert(i >= e);
            break;
        }
    }

    /* empty lines before the request line: skipped, whole or fed byte by
     * byte, and the head parses (it ended at byte 4 before) */
    {
        const char *t = "\r\n\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n";
        size_t e = 0;

        scanned = 0;
        assert(gw_http_head_end(t, 6, &scanned) == 0);
        for (size_t i = 1; i <= strlen(t) && e == 0; i++) {
            e = gw_http_head_end(t, i, &scanned);
        }
        assert(e == strlen(t));
        assert(parse(t) == 0);
        assert(eq(h.path, h.path_len, "/x"));
    }
}

static void
test_basic(void)
{
    assert(parse("GET /a/b?x=1&y HTTP/1.1\r\nHost: h\r\nX-Y:  v w \r\n\r\n")
           == 0);
    assert(eq(h.method, h.method_len, "GET"));
    assert(eq(h.path, h.path_len, "/a/b"));
    assert(eq(h.query, h.query_len, "x=1&y"));
    assert(h.minor == 1 && h.keep_alive == 1 && h.content_length == -1);
    assert(h.nheaders == 2);
    assert(eq(h.headers[1].value, h.headers[1].value_len, "v w"));
    assert(gw_http_find(&h, "x-y", 3) == &h.headers[1]);
    assert(gw_http_find(&h, "X-Z", 3) == NULL);
    assert(gw_http_count(&h, "x-y", 3) == 1);
    assert(gw_http_count(&h, "x-z", 3) == 0);
    /* a repeated field: found first, counted twice, whatever the case */
    assert(parse("GET / HTTP/1.1\r\nHost: h\r\nIdem: a\r\nX: 1\r\n"
                 "IDEM: b\r\n\r\n") == 0);
    assert(gw_http_find(&h, "idem", 4) == &h.headers[1]);
    assert(gw_http_count(&h, "Idem", 4) == 2);
    assert(gw_http_count(&h, "ide", 3) == 0);
}

static void
test_connection(void)
{
    assert(parse("GET / HTTP/1.0\r\n\r\n") == 0 && h.keep_alive == 0);
    assert(parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n") == 0
           && h.keep_alive == 1);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: x, close\r\n\r\n")
           == 0 && h.keep_alive == 0);
}

static void
test_rejects(void)
{
    assert(parse("GET / HTTP/1.1\r\n\r\n") == 400);            /* no Host */
    assert(strcmp(h.refusal, "missing Host header") == 0);
    assert(eq(h.method, h.method_len, "GET"));
    assert(parse("GET / HTTP/2.0\r\nHost: a\r\n\r\n") == 505);
    assert(why(&h, "HTTP version not supported"));
    assert(eq(h.method, h.method_len, "GET"));
    assert(parse("GET x HTTP/1.1\r\nHost: a\r\n\r\n") == 400);
    assert(parse("GET  / HTTP/1.1\r\nHost: a\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost : a\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n") == 400);
    assert(why(&h, "more than one Host header"));
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n") == 400);
    assert(why(&h, "more than one Host header"));
    assert(parse("GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n")
           == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                 "Content-Length: 2\r\n\r\n") == 400);
    assert(strcmp(h.refusal, "conflicting Content-Length values") == 0);
    assert(parse("GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                 "Content-Length: 1\r\n\r\n") == 0 && h.refusal == NULL);
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n") == 400);
    assert(strcmp(h.refusal, "both Content-Length and Transfer-Encoding")
           == 0);
    assert(eq(h.method, h.method_len, "POST"));
    assert(parse("POST / HTTP/1.0\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n") == 400);
    assert(strcmp(h.refusal, "Transfer-Encoding on HTTP/1.0") == 0);
    /* a malformed head names none (the server says "malformed request
     * head"); a method is known only when read whole, followed by its
     * space */
    assert(parse("GET  / HTTP/1.1\r\nHost: a\r\n\r\n") == 400
           && h.refusal == NULL && eq(h.method, h.method_len, "GET"));
    assert(parse("GET\tx / HTTP/1.1\r\nHost: a\r\n\r\n") == 400
           && h.method_len == 0);
    /* RFC 9112 6.3: chunked not the final coding (absent, or followed by
     * another, in one line or over two) is 400, a MUST; another coding
     * before a final chunked is 501 (6.1) */
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: gzip\r\n\r\n") == 400);
    assert(why(&h, "chunked not the final transfer coding"));
    assert(eq(h.method, h.method_len, "POST"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: chunked, identity\r\n\r\n") == 400);
    assert(why(&h, "chunked not the final transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                 "chunked\r\nTransfer-Encoding: gzip\r\n\r\n") == 400);
    assert(why(&h, "chunked not the final transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                 "chunked\r\nTransfer-Encoding: chunked\r\n\r\n") == 400);
    assert(why(&h, "chunked applied more than once"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: chunked, chunked\r\n\r\n") == 400);
    assert(why(&h, "chunked applied more than once"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: gzip, chunked\r\n\r\n") == 501);
    assert(why(&h, "unsupported transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: xchunked\r\n\r\n") == 400);
    assert(why(&h, "chunked not the final transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: \r\n\r\n") == 400);
    assert(why(&h, "chunked not the final transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                 "gzip\r\nTransfer-Encoding: chunked\r\n\r\n") == 501);
    assert(why(&h, "unsupported transfer coding"));
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: Chunked\r\n\r\n") == 0 && h.chunked);
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\n"
                 "Transfer-Encoding: , chunked ,\r\n\r\n") == 0
           && h.chunked);
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: magic\r\n\r\n")
           == 417);
    assert(why(&h, "unsupported expectation"));
    assert(eq(h.method, h.method_len, "POST"));
    /* bare LF ends no line; a 101st field is 431 (the 100th is fine) */
    assert(parse("GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n") == 400);
    {
        static char big[64 + 101 * 8];
        size_t n = (size_t) sprintf(big, "GET / HTTP/1.1\r\nHost: a\r\n");

        for (int i = 1; i < MAX_FIELDS; i++) {
            n += (size_t) sprintf(big + n, "X%02d: v\r\n", i % 100);
        }
        strcpy(big + n, "\r\n");
        assert(gw_http_count_fields(big, strlen(big)) == MAX_FIELDS + 1);
        assert(parse(big) == 0 && h.nheaders == MAX_FIELDS);
        n += (size_t) sprintf(big + n, "Y: v\r\n");
        strcpy(big + n, "\r\n");
        assert(parse(big) == 431);
    }
    /* the same length twice is allowed */
    assert(parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n"
                 "Content-Length: 2\r\n\r\n") == 0 && h.content_length == 2);
}

static void
test_conformance(void)
{
    char out[64];
    size_t n;

    /* Host must be a uri-host [":" port] (RFC 9112 3.2) */
    assert(parse("GET / HTTP/1.1\r\nHost: a b\r\n\r\n") == 400);
    assert(why(&h, "invalid Host header"));
    assert(parse("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a, b\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a:x\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n") == 400);
    assert(parse("GET / HTTP/1.1\r\nHost: a.b-c:8080\r\n\r\n") == 0);
    assert(parse("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n") == 0);
    assert(parse("GET / HTTP/1.1\r\nHost:\r\n\r\n") == 0);
    /* absolute-form: routed by its path; the target stays as sent */
    assert(parse("GET http://h:1/p/q?x=1 HTTP/1.1\r\nHost: h\r\n\r\n")
           == 0);
    assert(eq(h.path, h.path_len, "/p/q") && eq(h.query, h.query_len, "x=1"));
    assert(eq(h.target, h.target_len, "http://h:1/p/q?x=1"));
    assert(parse("GET HTTPS://h?y HTTP/1.1\r\nHost: h\r\n\r\n") == 0);
    assert(eq(h.path, h.path_len, "/") && h.path_outside
           && eq(h.query, h.query_len, "y"));
    assert(parse("GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
    assert(parse("GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
    assert(parse("GET http:///p HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
    /* asterisk-form: OPTIONS only (RFC 9112 3.2.4) */
    assert(parse("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n") == 0
           && eq(h.path, h.path_len, "*"));
    assert(parse("GET * HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
    assert(parse("OPTIONSX * HTTP/1.1\r\nHost: h\r\n\r\n") == 400);
    assert(early("GET * HTTP/1.1\r\nHo") == 400);
    /* refused before the head is complete: with its method when read
     * whole, followed by its space, as the full parse tells it (the same
     * request split otherwise is counted and logged the same) */
    assert(early("GET / HTTP/1.1\nHo") == 400);
    assert(eq(eh.method, eh.method_len, "GET") && eh.refusal == NULL);
    assert(early("PUT /\x01x") == 0);
    assert(early("PUT /\x01x HTTP/1.1\r\n") == 400);
    assert(eq(eh.method, eh.method_len, "PUT"));
    assert(early("DELETE /a\rb") == 400);
    assert(eq(eh.method, eh.method_len, "DELETE"));
    assert(early("GET / HTTP/1.1\r\nBad Name: v\r\n") == 400);
    assert(eq(eh.method, eh.method_len, "GET"));
    assert(early("\r\n\r\nPOST / HTTP/1.1\r\nX: a\r\n b\r\n") == 400);
    assert(eq(eh.method, eh.method_len, "POST"));
    assert(early("GET / HTTP/2.0\r\n") == 505);
    assert(why(&eh, "HTTP version not supported"));
    assert(eq(eh.method, eh.method_len, "GET"));
    assert(gw_http_head_early("\x16\x03\x01\x02\x00", 5, 0, &eh) == 400);
    assert(eh.method_len == 0);
    assert(early("ABCDEFGHIJKLMNOPQRSTU") == 400 && eh.method_len == 0);
    assert(early("GET\nx") == 400 && eh.method_len == 0);
    assert(early("GET\r\n") == 400 && eh.method_len == 0);
    /* nothing told when not refused (a later 408 counts OTHER) */
    assert(early("\r\nGET / HTTP/1.1\r\nHost") == 0);
    assert(eh.method_len == 0 && eh.refusal == NULL);
    assert(early("GE") == 0 && eh.method_len == 0);
    assert(early("\r") == 0);
    /* a head refused before its parse (over the limit, too slow) names
     * the method its request line holds whole */
    {
        size_t at = 99;

        assert(gw_http_method_of("\r\nPOST /a HTTP/1.1\r\nX", 22, &at) == 4
               && at == 2);
        assert(gw_http_method_of("GET / HTTP/1.1", 14, &at) == 3 && at == 0);
        assert(gw_http_method_of("GET", 3, &at) == 0);
        assert(gw_http_method_of("GE T", 4, &at) == 2 && at == 0);
        assert(gw_http_method_of(" GET /", 6, &at) == 0);
        assert(gw_http_method_of("G\x01T /", 6, &at) == 0);
        assert(gw_http_method_of("ABCDEFGHIJKLMNOPQRSTU /", 23, &at) == 0);
        assert(gw_http_method_of("ABCDEFGHIJKLMNOPQRST /", 22, &at) == 20);
        assert(gw_http_method_of("", 0, &at) == 0);
        assert(gw_http_method_of("\r\n", 2, &at) == 0);
    }
    /* dot-segments */
    assert(gw_http_path_has_dots("/a/b.c/..d", 10) == 0);
    assert(gw_http_path_has_dots("/a/%2E%2e/b", 11) == 1);
    assert(gw_http_path_resolve("/a/../b", 7, out, &n) == 0
           && eq(out, n, "/b"));
    assert(gw_http_path_resolve("/a/./b/.", 8, out, &n) == 0
           && eq(out, n, "/a/b/"));
    assert(gw_http_path_resolve("/a/b/..", 7, out, &n) == 0
           && eq(out, n, "/a/"));
    assert(gw_http_path_resolve("/a/..", 5, out, &n) == 0
           && eq(out, n, "/"));
    assert(gw_http_path_resolve("/a/%2e%2E/%2e/c", 15, out, &n) == 0
           && eq(out, n, "/c"));
    assert(gw_http_path_resolve("/..", 3, out, &n) == -1);
    assert(gw_http_path_resolve("/a/../../etc", 12, out, &n) == -1);
}

static void
test_chunked(void)
{
    char body[] = "3\r\nabc\r\n10;ext\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nX";
    struct gw_chunked st;
    size_t len = strlen(body);

    memset(&st, 0, sizeof(st));
    /* byte by byte: state carries across calls */
    for (size_t i = 1; i <= len; i++) {
        int rc = gw_chunked_decode(&st, body, i);
        if (rc == 1) {
            assert(i == len - 1);
            break;
        }
        assert(rc == 0);
    }
    assert(st.out == 19 && memcmp(body, "abc0123456789abcdef", 19) == 0);
    assert(st.in == len - 1);

    {
        char bad[] = "zz\r\n";
        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, bad, strlen(bad)) == -1);
    }
    {
        char bad[] = "3\r\nabcX\r\n";
        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, bad, strlen(bad)) == -1);
    }
    {
        /* after the size: whitespace, then only ';' or CR */
        const char *bad[] = { "3 4\r\nabc\r\n", "0 1\r\n\r\n",
                              "3 \x01\r\nabc\r\n", "3;a\x7f\r\nabc\r\n",
                              "3;a\x00b\r\nabc\r\n", "3 x;e\r\nabc\r\n" };
        const size_t blen[] = { 10, 7, 10, 11, 12, 12 };
        const char *good[] = { "3 \r\nabc\r\n0\r\n\r\n",
                               "3\t ;e=\"v w\"\r\nabc\r\n0\r\n\r\n" };

        char copy[64];      /* decoded in place: not a literal */

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            memset(&st, 0, sizeof(st));
            memcpy(copy, bad[i], blen[i]);
            assert(gw_chunked_decode(&st, copy, blen[i]) == -1);
        }
        for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
            memset(&st, 0, sizeof(st));
            memcpy(copy, good[i], strlen(good[i]));
            assert(gw_chunked_decode(&st, copy, strlen(good[i])) == 1);
            assert(st.out == 3 && memcmp(copy, "abc", 3) == 0);
        }
    }
    {
        /* trailer lines are field lines (RFC 9112 7.1.2), refused like
         * a head's: no name or colon, obs-fold, a NUL or other control */
        const char *bad[] = { "0\r\nGET /x HTTP/1.1\r\n\r\n",
                              "0\r\nT: v\r\n folded\r\n\r\n",
                              "0\r\nT: a\x00b\r\n\r\n",
                              "0\r\nT : v\r\n\r\n", "0\r\n: v\r\n\r\n",
                              "0\r\nT: a\x01\r\n\r\n" };
        const size_t blen[] = { 22, 20, 13, 12, 10, 12 };
        const char *good[] = { "0\r\nT: v\r\nU:\r\nV: a\tb \xff\r\n\r\n" };
        char copy[64];

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
            memset(&st, 0, sizeof(st));
            memcpy(copy, bad[i], blen[i]);
            assert(gw_chunked_decode(&st, copy, blen[i]) == -1);
        }
        for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
            memset(&st, 0, sizeof(st));
            memcpy(copy, good[i], strlen(good[i]));
            assert(gw_chunked_decode(&st, copy, strlen(good[i])) == 1);
            assert(st.in == strlen(good[i]));
        }
    }
    {
        char huge[] = "ffffffffffffffff\r\n";
        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, huge, strlen(huge)) == -1);
    }
    {
        /* the bound is on the size, not on its digits: leading zeros
         * (1*HEXDIG) are fine, 60 bits are, 61 are not */
        char zeros[] = "00000000000000000000003\r\nabc\r\n0\r\n\r\n";
        char max[] = "fffffffffffffff\r\n";
        char over[] = "000001fffffffffffffff\r\n";

        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, zeros, strlen(zeros)) == 1);
        assert(st.out == 3 && memcmp(zeros, "abc", 3) == 0);
        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, max, strlen(max)) == 0);
        assert(st.remaining == 0xfffffffffffffffULL);
        memset(&st, 0, sizeof(st));
        assert(gw_chunked_decode(&st, over, strlen(over)) == -1);
    }
}

int
main(void)
{
    test_head_end();
    test_basic();
    test_connection();
    test_rejects();
    test_conformance();
    test_chunked();
    printf("test_http_parser: ok\n");
    return 0;
}
