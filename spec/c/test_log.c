/*
 * test_log.c -- gw_json_quote makes a valid JSON string, in valid UTF-8,
 * of any bytes: a log line must parse whatever a client or handler sent.
 */
#include <assert.h>
#include <stdio.h>
#include <string.h>

#include "log.h"

static char out[1024];

static const char *
quote(const char *s, size_t len)
{
    size_t n = gw_json_quote(out, sizeof(out), s, len);

    assert(n > 0 && n < sizeof(out));
    out[n] = '\0';
    return out;
}

#define Q(lit) quote(lit, sizeof(lit) - 1)

int
main(void)
{
    /* plain, escapes, control characters */
    assert(strcmp(Q("abc"), "\"abc\"") == 0);
    assert(strcmp(Q("a\"b\\c"), "\"a\\\"b\\\\c\"") == 0);
    assert(strcmp(Q("\n\t\x01\x7f"), "\"\\n\\t\\u0001\\u007f\"") == 0);
    assert(strcmp(Q("a\0b"), "\"a\\u0000b\"") == 0);
    /* valid UTF-8 passes as it is: 2, 3 and 4 bytes */
    assert(strcmp(Q("\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80"),
                  "\"\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\"") == 0);
    /* invalid UTF-8 is replaced, byte by byte, with U+FFFD */
    assert(strcmp(Q("a\xff" "b"), "\"a\\ufffdb\"") == 0);
    assert(strcmp(Q("\x80"), "\"\\ufffd\"") == 0);              /* lone cont. */
    assert(strcmp(Q("\xc3"), "\"\\ufffd\"") == 0);              /* cut short */
    assert(strcmp(Q("\xe4\xb8"), "\"\\ufffd\\ufffd\"") == 0);   /* cut short */
    assert(strcmp(Q("\xc0\xaf"), "\"\\ufffd\\ufffd\"") == 0);   /* overlong */
    assert(strcmp(Q("\xe0\x80\xaf"), "\"\\ufffd\\ufffd\\ufffd\"") == 0);
    assert(strcmp(Q("\xed\xa0\x80"), "\"\\ufffd\\ufffd\\ufffd\"") == 0); /* surrogate */
    assert(strcmp(Q("\xf4\x90\x80\x80"),                        /* > U+10FFFF */
                  "\"\\ufffd\\ufffd\\ufffd\\ufffd\"") == 0);
    assert(strcmp(Q("\xc3(") , "\"\\ufffd(\"") == 0);
    /* too small a buffer says so */
    assert(gw_json_quote(out, 4, "abcdef", 6) == 0);
    puts("test_log: ok");
    return 0;
}
