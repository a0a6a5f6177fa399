/*
 * sockaddr.h -- an IPv4 or IPv6 socket address as text, the one way the
 * runtime writes one: "IP:PORT", "[IP]:PORT" for IPv6 (a request's local
 * address, a connection's peer, the address a listener is bound to).
 */
#ifndef GW_SOCKADDR_H
#define GW_SOCKADDR_H

#include <stddef.h>
#include <sys/socket.h>

/* sa as text in buf (len bytes: 64 hold any). Returns buf, or NULL for a
 * family neither IPv4 nor IPv6, or an address inet_ntop refuses. */
const char *gw_sockaddr_text(const struct sockaddr_storage *sa, char *buf,
                             size_t len);

#endif
