/*
 * dns.c -- see dns.h.
 *
 * One evdns base per process, made on first use on the loop's base (a
 * worker makes its own after the fork). A query asks A and AAAA at once;
 * when both answered, the result goes to the cache and to every request
 * waiting on that name, on a later loop turn (gw_loop_post), so that a
 * callback never runs inside gw_dns_resolve() or gw_dns_configure().
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <event2/dns.h>
#include <event2/event.h>

#include "dns.h"
#include "loop.h"
#include "runtime.h"

#define DNS_CACHE_MAX  256              /* names cached at most */
#define DNS_NAME_MAX   256              /* bytes of a name, with the NUL */
#define DNS_HOSTS_MAX  256              /* /etc/hosts entries kept */

struct gw_dns_req {
    gw_dns_cb           cb;             /* caller's */
    void               *arg;            /* caller's */
    struct dns_query   *q;              /* the query it waits on */
    struct gw_dns_req  *next;           /* q's waiter list */
};

struct dns_entry {
    char                name[DNS_NAME_MAX]; /* "" = free slot */
    double              expires;        /* monotonic s */
    int                 failed;         /* 1: err holds why */
    char                err[120];
    struct gw_dns_addrs a;              /* when !failed */
};

struct dns_query {
    char                name[DNS_NAME_MAX]; /* normalized */
    int                 pending;        /* evdns lookups outstanding */
    struct gw_dns_addrs a4, a6;         /* answers so far */
    int                 ttl;            /* s: smallest TTL seen, -1 none */
    int                 err;            /* last evdns error, 0 none */
    struct gw_dns_req  *waiters;        /* owned until delivered */
    struct dns_entry    res;            /* done: the outcome (as cached) */
    struct dns_query   *next;           /* in-flight list */
};

struct dns_host {
    char                name[DNS_NAME_MAX]; /* lower case */
    char                addr[GW_DNS_ADDRLEN];
    int                 v4;             /* 1: addr is IPv4 */
};

static struct {
    struct evdns_base  *evdns;          /* owned; NULL until first use */
    struct event_base  *base;           /* the loop evdns was made on */
    char                resolver[64];   /* "IP:PORT", "" = resolv.conf */
    double              ttl_min;        /* s */
    double              ttl_max;        /* s */
    double              timeout;        /* s per attempt */
    struct dns_query   *queries;        /* in flight */
    struct dns_entry    cache[DNS_CACHE_MAX];
    struct dns_host     hosts[DNS_HOSTS_MAX];
    int                 nhosts;
    int                 hosts_read;     /* /etc/hosts read (once) */
} dns = { .ttl_min = 1, .ttl_max = 300, .timeout = 5 };

static void
normalize(const char *name, char *out)
{
    size_t i, n = strlen(name);

    if (n >= DNS_NAME_MAX) {
        n = DNS_NAME_MAX - 1;
    }
    for (i = 0; i < n; i++) {
        out[i] = (char)tolower((unsigned char)name[i]);
    }
    while (n > 1 && out[n - 1] == '.') {
        n--;                             /* "db.example." == "db.example" */
    }
    out[n] = '\0';
}

int
gw_dns_is_numeric(const char *name)
{
    unsigned char buf[sizeof(struct in6_addr)];

    return inet_pton(AF_INET, name, buf) == 1
           || inet_pton(AF_INET6, name, buf) == 1;
}

/* Reads /etc/hosts once (a small local file, at the first lookup). */
static void
hosts_read(void)
{
    FILE *f;
    char  line[1024];

    dns.hosts_read = 1;
    f = fopen("/etc/hosts", "r");
    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL
           && dns.nhosts < DNS_HOSTS_MAX)
    {
        char *save = NULL, *addr, *name, *hash = strchr(line, '#');

        if (hash != NULL) {
            *hash = '\0';
        }
        addr = strtok_r(line, " \t\r\n", &save);
        if (addr == NULL || !gw_dns_is_numeric(addr)
            || strlen(addr) >= GW_DNS_ADDRLEN)
        {
            continue;
        }
        while ((name = strtok_r(NULL, " \t\r\n", &save)) != NULL
               && dns.nhosts < DNS_HOSTS_MAX)
        {
            struct dns_host *h = &dns.hosts[dns.nhosts++];

            normalize(name, h->name);
            snprintf(h->addr, sizeof(h->addr), "%s", addr);
            h->v4 = strchr(addr, ':') == NULL;
        }
    }
    fclose(f);
}

static void
addrs_add(struct gw_dns_addrs *a, const char *addr)
{
    int i;

    for (i = 0; i < a->n; i++) {
        if (strcmp(a->addr[i], addr) == 0) {
            return;
        }
    }
    if (a->n < GW_DNS_MAXADDRS) {
        snprintf(a->addr[a->n++], GW_DNS_ADDRLEN, "%s", addr);
    }
}

/* /etc/hosts: IPv4 entries first. Returns the count found. */
static int
hosts_lookup(const char *name, struct gw_dns_addrs *out)
{
    int i, pass;

    if (!dns.hosts_read) {
        hosts_read();
    }
    out->n = 0;
    for (pass = 0; pass < 2; pass++) {
        for (i = 0; i < dns.nhosts; i++) {
            if (dns.hosts[i].v4 == (pass == 0)
                && strcmp(dns.hosts[i].name, name) == 0)
            {
                addrs_add(out, dns.hosts[i].addr);
            }
        }
    }
    out->ttl = dns.ttl_max;
    return out->n;
}

static struct dns_entry *
cache_find(const char *name)
{
    int i;

    for (i = 0; i < DNS_CACHE_MAX; i++) {
        if (dns.cache[i].name[0] != '\0'
            && strcmp(dns.cache[i].name, name) == 0)
        {
            return &dns.cache[i];
        }
    }
    return NULL;
}

/* The slot for name: its own, a free one, or the one expiring first. */
static struct dns_entry *
cache_slot(const char *name)
{
    struct dns_entry *e = cache_find(name), *old = NULL;
    int               i;

    if (e != NULL) {
        return e;
    }
    for (i = 0; i < DNS_CACHE_MAX; i++) {
        e = &dns.cache[i];
        if (e->name[0] == '\0') {
            return e;
        }
        if (old == NULL || e->expires < old->expires) {
            old = e;
        }
    }
    return old;
}

void
gw_dns_flush(void)
{
    memset(dns.cache, 0, sizeof(dns.cache));
}

static double
clamp_ttl(double ttl)
{
    if (ttl < dns.ttl_min) {
        return dns.ttl_min;
    }
    return ttl > dns.ttl_max ? dns.ttl_max : ttl;
}

int
gw_dns_cached(const char *name, struct gw_dns_addrs *out, char *err,
              size_t errlen)
{
    char              key[DNS_NAME_MAX];
    struct dns_entry *e;
    double            now = gw_loop_mono_fresh();

    if (gw_dns_is_numeric(name)) {
        out->n = 1;
        out->ttl = dns.ttl_max;
        snprintf(out->addr[0], GW_DNS_ADDRLEN, "%s", name);
        return GW_OK;
    }
    normalize(name, key);
    if (key[0] == '\0') {
        snprintf(err, errlen, "empty host name");
        return GW_ERR;
    }
    if (hosts_lookup(key, out) > 0) {
        return GW_OK;
    }
    e = cache_find(key);
    if (e == NULL || e->expires <= now) {
        return GW_AGAIN;
    }
    if (e->failed) {
        snprintf(err, errlen, "%s", e->err);
        return GW_ERR;
    }
    *out = e->a;
    out->ttl = e->expires - now;
    return GW_OK;
}

/* Splits "IP:PORT", "IP", "[V6]:PORT" into "IP" + port (53). */
static int
parse_resolver(const char *spec, char *ip, size_t iplen, int *port)
{
    const char *colon, *end;
    char       *stop;
    long        p = 53;
    size_t      n;

    if (spec[0] == '[') {
        end = strchr(spec, ']');
        if (end == NULL || (end[1] != '\0' && end[1] != ':')) {
            return GW_ERR;
        }
        n = (size_t)(end - spec - 1);
        colon = end[1] == ':' ? end + 1 : NULL;
        spec++;
    } else {
        colon = strchr(spec, ':');
        if (colon != NULL && strchr(colon + 1, ':') != NULL) {
            colon = NULL;                /* a bare IPv6 address */
            n = strlen(spec);
        } else {
            n = colon != NULL ? (size_t)(colon - spec) : strlen(spec);
        }
    }
    if (n == 0 || n >= iplen) {
        return GW_ERR;
    }
    memcpy(ip, spec, n);
    ip[n] = '\0';
    if (colon != NULL) {
        p = strtol(colon + 1, &stop, 10);
        if (colon[1] == '\0' || *stop != '\0' || p < 1 || p > 65535) {
            return GW_ERR;
        }
    }
    *port = (int)p;
    return gw_dns_is_numeric(ip) ? GW_OK : GW_ERR;
}

int
gw_dns_check_resolver(const char *spec, char *err, size_t errlen)
{
    char ip[GW_DNS_ADDRLEN];
    int  port;

    if (spec[0] != '\0' && parse_resolver(spec, ip, sizeof(ip), &port)
        != GW_OK)
    {
        snprintf(err, errlen, "resolver must be \"IP:PORT\" or \"IP\" (a"
                 " numeric address), got \"%.60s\"", spec);
        return GW_ERR;
    }
    return GW_OK;
}

/* Drops the evdns base: its lookups end with an error, which delivers
 * to their waiters on a later turn. */
static void
evdns_drop(void)
{
    if (dns.evdns != NULL && dns.base == gw_loop_base()) {
        evdns_base_free(dns.evdns, 1);
    }
    dns.evdns = NULL;                    /* another loop's: forgotten */
    dns.base = NULL;
}

int
gw_dns_configure(const char *resolver, double ttl_min, double ttl_max,
                 double timeout, char *err, size_t errlen)
{
    if (resolver != NULL
        && gw_dns_check_resolver(resolver, err, errlen) != GW_OK)
    {
        return GW_ERR;
    }
    if (ttl_min >= 0) {
        dns.ttl_min = ttl_min;
    }
    if (ttl_max >= 0) {
        dns.ttl_max = ttl_max;
    }
    if (dns.ttl_max < dns.ttl_min) {
        dns.ttl_max = dns.ttl_min;
    }
    if (timeout > 0) {
        dns.timeout = timeout;
    }
    if (resolver != NULL) {
        snprintf(dns.resolver, sizeof(dns.resolver), "%s", resolver);
    }
    evdns_drop();                        /* the next lookup makes a new */
    gw_dns_flush();
    return GW_OK;
}

static struct evdns_base *
evdns_get(void)
{
    struct event_base *base = gw_loop_base();
    char               ip[GW_DNS_ADDRLEN], addr[80], num[32];
    int                port;

    if (dns.evdns != NULL && dns.base == base) {
        return dns.evdns;
    }
    dns.evdns = NULL;                    /* made on another loop (fork) */
    if (dns.resolver[0] != '\0') {
        if (parse_resolver(dns.resolver, ip, sizeof(ip), &port) != GW_OK) {
            return NULL;
        }
        dns.evdns = evdns_base_new(base, EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (dns.evdns == NULL) {
            return NULL;
        }
        snprintf(addr, sizeof(addr), strchr(ip, ':') ? "[%s]:%d" : "%s:%d",
                 ip, port);
        if (evdns_base_nameserver_ip_add(dns.evdns, addr) != 0) {
            evdns_base_free(dns.evdns, 0);
            dns.evdns = NULL;
            return NULL;
        }
    } else {
        /* resolv.conf (read now, once); 127.0.0.1 when it names none. */
        dns.evdns = evdns_base_new(base, EVDNS_BASE_INITIALIZE_NAMESERVERS
                                         | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
        if (dns.evdns == NULL) {
            return NULL;
        }
    }
    snprintf(num, sizeof(num), "%g", dns.timeout);
    evdns_base_set_option(dns.evdns, "timeout:", num);
    evdns_base_set_option(dns.evdns, "attempts:", "2");
    dns.base = base;
    return dns.evdns;
}

static void
query_unlink(struct dns_query *q)
{
    struct dns_query **pp = &dns.queries;

    while (*pp != NULL && *pp != q) {
        pp = &(*pp)->next;
    }
    if (*pp == q) {
        *pp = q->next;
    }
}

/* Loop turn after the query finished: tells each waiter its outcome
 * (even one already gone from the cache: a TTL of 0, a flush), frees q. */
static void
query_deliver(void *arg)
{
    struct dns_query   *q = arg;
    struct dns_entry   *e = &q->res;
    struct gw_dns_req  *r;
    struct gw_dns_addrs a = e->a;
    double              left = e->expires - gw_loop_mono_fresh();

    a.ttl = left > 0 ? left : 0;
    while ((r = q->waiters) != NULL) {
        q->waiters = r->next;
        r->cb(r->arg, e->failed ? NULL : &a, e->failed ? e->err : NULL);
        free(r);
    }
    free(q);
}

static void
query_finish(struct dns_query *q)
{
    struct dns_entry *e = &q->res;
    int               i;

    query_unlink(q);
    memset(e, 0, sizeof(*e));
    snprintf(e->name, sizeof(e->name), "%s", q->name);
    for (i = 0; i < q->a6.n; i++) {
        addrs_add(&q->a4, q->a6.addr[i]);
    }
    if (q->a4.n > 0) {
        double ttl = clamp_ttl(q->ttl < 0 ? 0 : q->ttl);

        e->a = q->a4;
        e->a.ttl = ttl;
        e->expires = gw_loop_mono_fresh() + ttl;
    } else {
        e->failed = 1;
        snprintf(e->err, sizeof(e->err), "%.60s: %s", q->name,
                 q->err != 0 ? evdns_err_to_string(q->err)
                             : "no address");
        e->expires = gw_loop_mono_fresh() + dns.ttl_min;
    }
    *cache_slot(q->name) = *e;
    if (gw_loop_post(query_deliver, q) != GW_OK) {
        gw_log(GW_LOG_ERROR, "dns: cannot post an answer: no memory");
    }
}

static void
on_answer(int result, char type, int count, int ttl, void *addresses,
          void *arg)
{
    struct dns_query *q = arg;
    char              buf[GW_DNS_ADDRLEN];
    int               i;

    if (result == DNS_ERR_NONE) {
        for (i = 0; i < count; i++) {
            const void *src = type == DNS_IPv4_A
                ? (const void *)((const struct in_addr *)addresses + i)
                : (const void *)((const struct in6_addr *)addresses + i);

            if (type != DNS_IPv4_A && type != DNS_IPv6_AAAA) {
                break;
            }
            if (inet_ntop(type == DNS_IPv4_A ? AF_INET : AF_INET6, src, buf,
                          sizeof(buf)) != NULL)
            {
                addrs_add(type == DNS_IPv4_A ? &q->a4 : &q->a6, buf);
            }
        }
        if (count > 0 && (q->ttl < 0 || ttl < q->ttl)) {
            q->ttl = ttl;
        }
    } else if (result != DNS_ERR_NOTEXIST || q->err == 0) {
        q->err = result;
    }
    if (--q->pending == 0) {
        query_finish(q);
    }
}

struct gw_dns_req *
gw_dns_resolve(const char *name, gw_dns_cb cb, void *arg)
{
    struct gw_dns_req *r = calloc(1, sizeof(*r));
    struct dns_query  *q;
    struct evdns_base *b;
    char               key[DNS_NAME_MAX];

    if (r == NULL) {
        return NULL;
    }
    r->cb = cb;
    r->arg = arg;
    normalize(name, key);
    for (q = dns.queries; q != NULL; q = q->next) {
        if (strcmp(q->name, key) == 0) {
            break;                       /* join the lookup in flight */
        }
    }
    if (q == NULL) {
        q = calloc(1, sizeof(*q));
        if (q == NULL) {
            free(r);
            return NULL;
        }
        snprintf(q->name, sizeof(q->name), "%s", key);
        q->ttl = -1;
        q->next = dns.queries;
        dns.queries = q;
        b = evdns_get();
        q->pending = 2;
        if (b == NULL || key[0] == '\0'
            || evdns_base_resolve_ipv4(b, key, 0, on_answer, q) == NULL)
        {
            q->pending--;
            q->err = DNS_ERR_UNKNOWN;
        }
        if (b == NULL || key[0] == '\0'
            || evdns_base_resolve_ipv6(b, key, 0, on_answer, q) == NULL)
        {
            q->pending--;
            q->err = DNS_ERR_UNKNOWN;
        }
        if (q->pending == 0) {
            query_finish(q);             /* delivery is posted */
        }
    }
    r->q = q;
    r->next = q->waiters;
    q->waiters = r;
    return r;
}

void
gw_dns_cancel(struct gw_dns_req *req)
{
    struct gw_dns_req **pp;

    if (req == NULL) {
        return;
    }
    for (pp = &req->q->waiters; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == req) {
            *pp = req->next;
            break;
        }
    }
    free(req);
}
