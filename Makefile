# callagent - build, test, run.
#
#   make            build build/release/callagent (and build/callagent, a link to it)
#   make deps       install the Debian packages that are missing (apt-get as root)
#   make test       deps + build + the whole test suite; SAN=1 runs it under ASan+UBSan
#   make run        deps + build + start examples/app.lua
#   make bench      the concurrent-call benchmark (see README.md)
#   make fuzz       libFuzzer on the bridge's per-frame path (clang; FUZZ_SECONDS=60)
#   make install    PREFIX=/usr/local: binary (+ its libexec/callagent/callagent-pdeathsig),
#                   Lua files, providers/ (make uninstall removes them)
#   make clean      removes build/
#
# Everything the project needs comes from Debian 12 packages (see DEB_PKGS)
# and, for the browser tests, npm (tests/package.json).

PREFIX ?= /usr/local
DESTDIR ?=
SAN ?=
WERROR ?=

DEB_PKGS := build-essential pkg-config ca-certificates openssl tzdata espeak-ng \
	liblua5.4-dev libuv1-dev libwebsockets-dev libwebsockets-evlib-uv \
	libcurl4-openssl-dev lua-cjson-dev libssl-dev libsqlite3-dev
# Only the tests need these.
DEB_TEST_PKGS := chromium fonts-liberation

ifeq ($(SAN),1)
BUILD := build/san
OPT := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDSAN := -fsanitize=address,undefined
else
BUILD := build/release
OPT := -O2 -g
LDSAN :=
endif

PKG_MODULES := lua5.4 libuv libwebsockets libcurl openssl sqlite3
# Recursive (=) so pkg-config runs after `make deps` has installed it all.
PKG_CFLAGS = $(shell pkg-config --cflags $(PKG_MODULES))
PKG_LIBS = $(shell pkg-config --libs $(PKG_MODULES)) -llua5.4-cjson

WARN := -Wall -Wextra -Wshadow -Wmissing-prototypes -Wstrict-prototypes
ifeq ($(WERROR),1)
WARN += -Werror
endif

CFLAGS ?=
CFLAGS_ALL = -std=gnu11 $(OPT) $(WARN) -DCA_DATADIR='"$(PREFIX)/share/callagent"' \
	$(PKG_CFLAGS) -I/usr/include/lua5.4 $(CFLAGS)
LDFLAGS ?=

SRCS := $(wildcard src/*.c)
OBJS := $(patsubst src/%.c,$(BUILD)/obj/%.o,$(SRCS))
LIB_OBJS := $(filter-out $(BUILD)/obj/main.o,$(OBJS))
CTESTS := $(patsubst tests/c/%.c,$(BUILD)/tests/%,$(filter-out tests/c/host_stub.c,$(wildcard tests/c/test_*.c)))
BIN := $(BUILD)/callagent
# The wrapper kill_on_exit children start through (src/pdeathsig.c): libc only, so it execs fast.
WRAPPER := $(BUILD)/callagent-pdeathsig

.PHONY: all deps test-deps test run bench fuzz install uninstall clean

all: $(BIN) $(WRAPPER)

$(BUILD)/obj/%.o: src/%.c src/*.h | $(BUILD)/obj
	$(CC) $(CFLAGS_ALL) -c -o $@ $<

$(BIN): $(OBJS)
	$(CC) $(LDSAN) $(LDFLAGS) -o $@ $(OBJS) $(PKG_LIBS) -lm
ifneq ($(SAN),1)
	ln -sfn release/callagent build/callagent
endif

$(WRAPPER): src/pdeathsig.c src/ca.h | $(BUILD)/obj
	$(CC) $(CFLAGS_ALL) -DCA_PDEATHSIG_MAIN $(LDSAN) $(LDFLAGS) -o $@ src/pdeathsig.c

$(BUILD)/tests/%: tests/c/%.c tests/c/host_stub.c $(LIB_OBJS) | $(BUILD)/tests
	$(CC) $(CFLAGS_ALL) -Isrc $(LDSAN) $(LDFLAGS) -o $@ $< tests/c/host_stub.c $(LIB_OBJS) $(PKG_LIBS) -lm

$(BUILD)/obj $(BUILD)/tests:
	mkdir -p $@

# Installs what is missing; as root with apt-get, else prints the command.
deps:
	@missing=""; for p in $(DEB_PKGS) $(EXTRA_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "make deps: installing$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	  else \
	    echo "make deps: missing Debian packages. Run:"; \
	    echo "  sudo apt-get install -y$$missing"; exit 1; \
	  fi; \
	fi

# The browser test drives Debian's chromium with playwright-core (tests/package.json);
# npm ci runs again only when the lock file changes. Needs Node >= 20 (on the machine).
test-deps:
	@$(MAKE) --no-print-directory deps EXTRA_PKGS="$(DEB_TEST_PKGS)"
	@$(MAKE) --no-print-directory tests/node_modules/.package-lock.json

tests/node_modules/.package-lock.json: tests/package.json tests/package-lock.json
	cd tests && npm ci --no-audit --no-fund

test: test-deps
	@$(MAKE) --no-print-directory $(BIN) $(WRAPPER) $(CTESTS) $(BENCH_TOOLS) $(TEST_TOOLS)
	@CALLAGENT_SAN=$(SAN) tests/run $(BIN) $(BUILD)/tests

run: deps
	@$(MAKE) --no-print-directory $(BIN) $(WRAPPER)
	$(BIN) run examples/app.lua

# The benchmark's C helpers: the data-plane load generator and the loopback floor.
BENCH_TOOLS := build/release/tests/bench/loadgen build/release/tests/bench/loopback

build/release/tests/bench/loadgen: tests/bench/loadgen.c
	@mkdir -p $(@D)
	$(CC) -std=gnu11 -O2 -Wall -Wextra -o $@ $< -lssl -lcrypto

# A getaddrinfo() shim the tests preload to make name lookups slow (test_ws).
TEST_TOOLS := build/release/tests/slow_dns.so

build/release/tests/slow_dns.so: tests/c/slow_dns.c
	@mkdir -p $(@D)
	$(CC) -std=gnu11 -O2 -Wall -Wextra -shared -fPIC -o $@ $< -ldl

build/release/tests/bench/loopback: tests/bench/loopback.c
	@mkdir -p $(@D)
	$(CC) -std=gnu11 -O2 -Wall -Wextra -o $@ $<

bench: deps
	@$(MAKE) --no-print-directory $(BIN) $(WRAPPER) $(BENCH_TOOLS)
	$(BIN) run tests/bench/bench.lua

# libFuzzer on the bridge's per-frame path (tests/c/fuzz_bridge.c, which
# stands in for the bridge's two connections with ld --wrap): clang with
# ASan+UBSan, FUZZ_SECONDS of fuzzing, the corpus kept in
# build/fuzz/bridge-corpus. A crash leaves its input in build/fuzz/.
FUZZ_SECONDS ?= 60
FUZZ_SRCS := $(filter-out src/main.c,$(SRCS))

fuzz:
	@$(MAKE) --no-print-directory deps EXTRA_PKGS="clang libclang-rt-14-dev"
	@mkdir -p build/fuzz/bridge-corpus
	clang -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -w \
		$(PKG_CFLAGS) -I/usr/include/lua5.4 -Isrc -DBRIDGE_CHECK='"$(CURDIR)/tests/lib/bridge_check.lua"' \
		-Wl,--wrap=ca__ws_check -Wl,--wrap=ca__ws_send \
		-o build/fuzz/bridge tests/c/fuzz_bridge.c tests/c/host_stub.c $(FUZZ_SRCS) $(PKG_LIBS) -lm
	cd build/fuzz && ./bridge -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 bridge-corpus

install: $(BIN) $(WRAPPER)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/callagent $(DESTDIR)$(PREFIX)/libexec/callagent
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/callagent
	install -m 755 $(WRAPPER) $(DESTDIR)$(PREFIX)/libexec/callagent/callagent-pdeathsig
	cp -r lua $(DESTDIR)$(PREFIX)/share/callagent/
	if [ -d providers ]; then cp -r providers $(DESTDIR)$(PREFIX)/share/callagent/; fi

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/callagent
	rm -rf $(DESTDIR)$(PREFIX)/share/callagent $(DESTDIR)$(PREFIX)/libexec/callagent

clean:
	rm -rf build
