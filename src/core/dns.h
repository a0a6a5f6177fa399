/*
 * dns.h -- name resolution on the loop, for every connection the runtime
 * opens itself (PostgreSQL, Redis, ...): libevent's evdns, never the
 * blocking system resolver.
 *
 * /etc/hosts is read once, when the resolver is first used in the
 * process; /etc/resolv.conf names the servers unless gw_dns_configure()
 * set one (`resolver = "IP:PORT"`). Answers (A and AAAA, asked together)
 * are cached for their TTL, clamped to [ttl_min, ttl_max]; a failure is
 * cached for ttl_min. Lookups of one name share one query.
 */
#ifndef GW_DNS_H
#define GW_DNS_H

#include <stddef.h>

#define GW_DNS_MAXADDRS 16              /* addresses kept per name */
#define GW_DNS_ADDRLEN  46              /* INET6_ADDRSTRLEN */

/* The addresses of one name, IPv4 first, in the server's order. */
struct gw_dns_addrs {
    int    n;                           /* entries in addr */
    double ttl;                         /* s left (after clamping) */
    char   addr[GW_DNS_MAXADDRS][GW_DNS_ADDRLEN]; /* numeric, NUL-ended */
};

struct gw_dns_req;

/* Called once on the loop thread, never inside gw_dns_resolve(): err is
 * NULL and addrs has n >= 1 entries, or err says why not (addrs is then
 * NULL). Both are valid only during the call. */
typedef void (*gw_dns_cb)(void *arg, const struct gw_dns_addrs *addrs,
                          const char *err);

/* Settings; any NULL/negative argument keeps the current value.
 * resolver: "IP:PORT" or "IP" (port 53), "" for resolv.conf again.
 * Clears the cache. Returns GW_OK, or GW_ERR with a reason in err
 * (a bad address). */
int gw_dns_configure(const char *resolver, double ttl_min, double ttl_max,
                     double timeout, char *err, size_t errlen);

/* Checks "IP:PORT" / "IP" / "[IPv6]:PORT" without applying it. */
int gw_dns_check_resolver(const char *spec, char *err, size_t errlen);

/* 1 when name is a numeric IPv4 or IPv6 address (nothing to resolve). */
int gw_dns_is_numeric(const char *name);

/* A fresh answer without any I/O: /etc/hosts, a numeric name, or the
 * cache. Returns GW_OK (*out filled), GW_ERR (a cached failure; its
 * reason in err) or GW_AGAIN (ask gw_dns_resolve()). */
int gw_dns_cached(const char *name, struct gw_dns_addrs *out, char *err,
                  size_t errlen);

/* Resolves name; cb(arg, ...) runs once later on the loop, unless the
 * request is cancelled first. Returns the request, or NULL when out of
 * memory (cb never runs). */
struct gw_dns_req *gw_dns_resolve(const char *name, gw_dns_cb cb,
                                  void *arg);

/* cb will not run; frees req. Only before cb ran. NULL-safe. */
void gw_dns_cancel(struct gw_dns_req *req);

/* Forgets every cached answer. */
void gw_dns_flush(void);

#endif
