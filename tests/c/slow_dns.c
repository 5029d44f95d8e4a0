/*
 * slow_dns.c - an LD_PRELOAD shim for tests: a DNS that is slow or down,
 * without a DNS server. getaddrinfo() for a name ending in ".slow.test"
 * answers 127.0.0.1 after SLOW_DNS_MS (default 400) ms; for one ending in
 * ".fail.test" it fails (EAI_NONAME) after the same wait. Other names go to
 * the real getaddrinfo. Names ending in ".two.test" answer at once with two
 * addresses, 127.0.0.2 and then 127.0.0.1 (a server on 127.0.0.1 is reached
 * at the second), and in ".none.test" with 127.0.0.2 and 127.0.0.3. With
 * SLOW_DNS_LOG set, each lookup of a .test name appends a line with the
 * name to that file, and with SLOW_DNS_PORT set too, each connect() to an
 * IPv4 address on that port a line "connect ADDRESS" (the order addresses
 * are tried in).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int ends_with(const char *s, const char *tail)
{
	size_t n = strlen(s), t = strlen(tail);

	return n >= t && strcmp(s + n - t, tail) == 0;
}

static void log_line(const char *what, const char *s)
{
	const char *path = getenv("SLOW_DNS_LOG");
	int fd = path ? open(path, O_WRONLY | O_APPEND | O_CREAT, 0644) : -1;

	char line[512];
	int n = snprintf(line, sizeof line, "%s%s\n", what, s);
	ssize_t w;

	if (fd < 0)
		return;
	w = write(fd, line, (size_t)n);	/* one write: lines from threads do not mix */
	(void)w;
	close(fd);
}

static void wait_ms(void)
{
	const char *v = getenv("SLOW_DNS_MS");
	long ms = v ? atol(v) : 400;
	struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) != 0)
		;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints,
		struct addrinfo **res)
{
	int (*real)(const char *, const char *, const struct addrinfo *, struct addrinfo **) =
		(int (*)(const char *, const char *, const struct addrinfo *, struct addrinfo **))
			dlsym(RTLD_NEXT, "getaddrinfo");

	if (node && ends_with(node, ".slow.test")) {
		log_line("", node);
		wait_ms();
		return real("127.0.0.1", service, hints, res);
	}
	if (node && ends_with(node, ".fail.test")) {
		log_line("", node);
		wait_ms();
		return EAI_NONAME;
	}
	if (node && (ends_with(node, ".two.test") || ends_with(node, ".none.test"))) {
		struct addrinfo *a = NULL, *b = NULL, *last;
		int rc;

		log_line("", node);
		rc = real("127.0.0.2", service, hints, &a);
		if (rc != 0)
			return rc;
		rc = real(ends_with(node, ".two.test") ? "127.0.0.1" : "127.0.0.3", service, hints, &b);
		if (rc != 0) {
			freeaddrinfo(a);
			return rc;
		}
		for (last = a; last->ai_next; last = last->ai_next)
			;
		last->ai_next = b;
		*res = a;
		return 0;
	}
	return real(node, service, hints, res);
}

int connect(int fd, const struct sockaddr *sa, socklen_t len)
{
	int (*real)(int, const struct sockaddr *, socklen_t) =
		(int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
	const char *port = getenv("SLOW_DNS_PORT");

	if (port && sa && sa->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)(const void *)sa;
		char addr[INET_ADDRSTRLEN];

		if (ntohs(in->sin_port) == atoi(port) && inet_ntop(AF_INET, &in->sin_addr, addr, sizeof addr))
			log_line("connect ", addr);
	}
	return real(fd, sa, len);
}
