# duet — run `make help` for the targets. Privileged steps (BPF, namespaces,
# loop devices) go through sudo only when not already root.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -E)
GO ?= go
BIN := bin/duet
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/duet-ha/duet/pkg/node.Version=$(VERSION)
export DUET_BIN := $(abspath $(BIN))
DIST := dist
# What the package holds besides the repository's files: shell completions
# and man pages, generated from the commands by make package.
PKG_BUILD := build/package
export DUET_PKG_BUILD := $(abspath $(PKG_BUILD))
# A package version starts with a digit: a build without a release tag
# (git describe gives the commit) is 0.0.0 with git<commit> as its
# pre-release, which nfpm writes 0.0.0~git<commit>.
export DUET_PKG_VERSION := $(if $(filter v%,$(VERSION)),$(VERSION),0.0.0-git$(VERSION))
# Fuzz budgets are execution counts, not durations: a duration budget races
# the Go fuzz coordinator's deadline (golang/go#75804, fixed in Go 1.27) and
# fails with "context deadline exceeded" without any crashing input.
FUZZTIME ?= 400000x

.PHONY: help build package generate check-generate test test-fs test-fs-mixed unit race e2e fuzz demo lab-up lab-down bench vet clean vagrant-check check-monitoring k3s-soak nemesis zeroloss

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

# Without cgo the binary is static: it runs on any distribution's libc,
# and its package depends on none.
build: ## build bin/duet, a static binary (needs only Go: BPF objects are committed)
	CGO_ENABLED=0 $(GO) build -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/duet

package: build ## the .deb and .rpm of bin/duet, its unit, completions, man pages, monitoring files and docs, into dist/ (amd64)
	rm -rf $(PKG_BUILD)
	mkdir -p $(DIST) $(PKG_BUILD)/completions $(PKG_BUILD)/man
	$(BIN) completion bash >$(PKG_BUILD)/completions/duet
	$(BIN) completion zsh >$(PKG_BUILD)/completions/_duet
	$(BIN) completion fish >$(PKG_BUILD)/completions/duet.fish
	@# Dated by the last commit, not the build: the same commit gives the same pages.
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || date +%s) $(GO) run ./tools/mangen -version $(VERSION) $(PKG_BUILD)/man
	gzip -9n $(PKG_BUILD)/man/*.1
	$(GO) tool nfpm package --config packaging/nfpm.yaml --packager deb --target $(DIST)/
	$(GO) tool nfpm package --config packaging/nfpm.yaml --packager rpm --target $(DIST)/

generate: ## regenerate the BPF objects with clang (bpf2go) and vmlinux.h from this kernel's BTF
	@command -v bpftool >/dev/null && command -v clang >/dev/null || { echo "make generate needs bpftool and clang (apt-get install bpftool clang llvm)"; exit 1; }
	@# Through a temporary file: a failed dump must not leave vmlinux.h empty.
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > bpf/include/vmlinux.h.tmp
	mv bpf/include/vmlinux.h.tmp bpf/include/vmlinux.h
	$(GO) generate ./pkg/capture/ ./tools/lab/faultnet/

check-generate: ## fail if the committed BPF objects differ from a fresh generate
	$(GO) generate ./pkg/capture/ ./tools/lab/faultnet/
	git diff --exit-code -- pkg/capture/ tools/lab/faultnet/

vet: ## go vet, staticcheck and gofmt
	$(GO) vet ./...
	$(GO) tool staticcheck ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

UNIT_PKGS := ./pkg/journal/ ./pkg/wire/ ./pkg/config/ ./pkg/replica/ ./pkg/nfsd/ ./pkg/nfsclient/ ./tools/lab/linearize/ ./tools/countercheck/
# Also free of the lab and of BPF: their goroutines (heartbeats, peer link,
# barrier service, hooks) are where a data race would hide.
RACE_PKGS := $(UNIT_PKGS) ./pkg/cli/ ./pkg/cluster/ ./pkg/fstree/ ./pkg/node/ ./pkg/peerlink/ ./pkg/stack/ ./pkg/barrier/

unit: ## unit tests of the pure packages (no root needed)
	$(GO) test -count=1 $(UNIT_PKGS)

race: ## the unit tests, and those of the other packages that need no lab, under the race detector
	@# Go turns cgo off when it finds no C compiler, and -race needs cgo.
	@[ "$$($(GO) env CGO_ENABLED)" = 1 ] || { echo "go test -race needs cgo, and Go found no C compiler ($$($(GO) env CC)): apt-get install gcc"; exit 1; }
	@# As root (sudo otherwise): make test's plain pass leaves these packages to it.
	$(SUDO) $(GO) test -count=1 -race $(RACE_PKGS)

fuzz: ## short fuzz runs of the frame decoder, the heartbeat parser and the applier's confinement
	$(GO) test -run '^$$' -fuzz FuzzDecodeFrame -fuzztime $(FUZZTIME) ./pkg/wire/
	$(GO) test -run '^$$' -fuzz FuzzParseHeartbeat -fuzztime 200000x ./pkg/cluster/
	@# Each input applies its ops to a fresh directory tree: about 150 a second.
	$(GO) test -run '^$$' -fuzz FuzzApplyConfined -fuzztime 3000x ./pkg/replica/

e2e: build ## kernel and lab tests (root): capture on loop ext4, two-node replication
	$(SUDO) $(GO) test -count=1 -p 1 -timeout 30m -v ./pkg/capture/ ./tools/lab/

test: vet build vagrant-check check-monitoring race ## everything CI runs: vet, race, unit, fuzz, kernel and lab tests (root)
	@# tools/lab's own tests need the lab; its packages (faultnet, linearize) run here.
	@# The race pass (above, as root too) ran RACE_PKGS' tests: here only the
	@# others, and those that the race detector's pace cuts short or skips.
	@# Two packages at once: none of them uses the lab's namespaces but
	@# tools/bench (the lab tests run alone, below); capture and the quick
	@# bench, the two long ones, overlap (about 3 minutes less).
	$(SUDO) $(GO) test -count=1 -p 2 -timeout 30m $$($(GO) list ./... | grep -v '/tools/lab$$' | grep -vxF "$$($(GO) list $(RACE_PKGS))")
	$(SUDO) $(GO) test -count=1 -run '^(TestInitialSyncHeapFlat|TestBatcherShipsEveryOpInOrder)$$' ./pkg/replica/
	@# The lab tests print what they measured (failover times, zero-loss
	@# counts); a failing one prints both daemons' logs, kept whole here.
	$(SUDO) env GO=$(GO) tools/lab/gotest.sh -count=1 -timeout 30m ./tools/lab/
	$(MAKE) test-fs
	$(MAKE) fuzz

# The replicated directories on XFS and on btrfs (docs/CAPTURE.md): the
# workload (its seeds, odd names), the three zero-loss tests (fewer kills
# than on ext4) and a resync, in a lab whose loop filesystems are each.
test-fs: build ## the lab's workload, zero-loss and resync tests with the nodes' directories on XFS, then btrfs (root)
	@for fs in xfs btrfs; do \
		echo "== lab tests on $$fs"; \
		$(SUDO) env GO=$(GO) DUET_LAB_FS=$$fs DUET_ZEROLOSS_ITERATIONS=12 tools/lab/gotest.sh -count=1 -timeout 20m -run 'TestReplicationWorkload$$|TestZeroLoss|TestResyncAfterCleanStop$$' ./tools/lab/ || exit 1; \
	done

# A replica on another filesystem than its source (docs/CAPTURE.md): nodeA's
# directories on the first, nodeB's on the second; the failback test makes
# nodeB the source, capturing on its filesystem, and resyncs nodeA from it.
FS_PAIRS ?= ext4:xfs xfs:btrfs btrfs:ext4
test-fs-mixed: build ## the workload, zero-loss, resync and failback tests with nodeA and nodeB on different filesystems (FS_PAIRS) (root)
	@for pair in $(FS_PAIRS); do \
		echo "== lab tests, nodeA on $${pair%:*}, nodeB on $${pair#*:}"; \
		$(SUDO) env GO=$(GO) DUET_LAB_FS=$${pair%:*} DUET_LAB_FS_B=$${pair#*:} DUET_ZEROLOSS_ITERATIONS=10 tools/lab/gotest.sh -count=1 -timeout 20m -run 'TestReplicationWorkload$$|TestZeroLoss|TestResyncAfterCleanStop$$|TestFailbackAfterPrimaryCrash$$' ./tools/lab/ || exit 1; \
	done

vagrant-check: build ## check the Vagrant lab and the shell scripts without VMs: vagrant validate, bash -n, shellcheck
	bash -n vagrant/failover-test.sh vagrant/provision/*.sh
	@if command -v shellcheck >/dev/null; then shellcheck -x vagrant/failover-test.sh vagrant/provision/*.sh tools/lab/lab.sh tools/lab/gotest.sh tools/demo.sh packaging/*.sh; else echo "shellcheck not installed: skipped"; fi
	@if command -v vagrant >/dev/null; then cd vagrant && vagrant validate --ignore-provider; else echo "vagrant not installed: vagrant validate skipped"; exit $${DUET_REQUIRE_STACK:+1}; fi

# The metric names these files use are checked against a node's registry by
# pkg/node's tests (go test), which need no promtool.
check-monitoring: ## promtool: the alert rules (deploy/prometheus) and their scenarios
	@if ! command -v promtool >/dev/null; then \
		if [ -n "$$CI" ]; then echo "promtool not installed (Debian package prometheus; .ci/run installs it)"; exit 1; fi; \
		echo "promtool not installed (apt-get install --no-install-recommends prometheus): check-monitoring skipped"; exit 0; \
	fi; \
	promtool check rules deploy/prometheus/duet-alerts.yml && promtool test rules deploy/prometheus/duet-alerts_test.yml

k3s-soak: build ## the k3s stack failover test, 20 runs (DUET_K3S_RUNS to change)
	$(SUDO) env GO=$(GO) DUET_K3S_RUNS=$${DUET_K3S_RUNS:-20} DUET_REQUIRE_STACK=1 tools/lab/gotest.sh -count=1 -timeout 60m -run TestK3SStackFailover ./tools/lab/

zeroloss: build ## the zero-loss tests (SIGKILL and power cuts) at length on ext4, XFS and btrfs: DUET_ZEROLOSS_ITERATIONS (150) kills each (a third for O_DSYNC and msync), DUET_POWERCUT_ROUNDS (5) (root)
	@for fs in ext4 xfs btrfs; do \
		echo "== zero-loss tests on $$fs"; \
		$(SUDO) env GO=$(GO) DUET_LAB_FS=$$fs DUET_ZEROLOSS_ITERATIONS=$${DUET_ZEROLOSS_ITERATIONS:-150} DUET_POWERCUT_ROUNDS=$${DUET_POWERCUT_ROUNDS:-5} tools/lab/gotest.sh -count=1 -timeout 120m -run 'TestZeroLoss' ./tools/lab/ || exit 1; \
	done

nemesis: build ## the fault campaign: DUET_NEMESIS_RUNS (30) random faults, DUET_NEMESIS_SEED to replay one, DUET_NEMESIS_KINDS=a,b to keep to those kinds
	$(SUDO) env GO=$(GO) DUET_NEMESIS_RUNS=$${DUET_NEMESIS_RUNS:-30} tools/lab/gotest.sh -count=1 -timeout 120m -run 'TestNemesisCampaign$$' ./tools/lab/

lab-up: build ## create the two-node lab (namespaces + loop ext4)
	$(SUDO) tools/lab/lab.sh up

lab-down: ## remove the lab, also after a failed test
	$(SUDO) tools/lab/lab.sh down

demo: build ## build, lab up, replicate, status, verify, fail over, fail back, swap, tear down
	$(SUDO) tools/demo.sh

# The scale figure's 1M files take about 10 GB on each lab filesystem
# (sparse images under /var/tmp, sized from -scale-files).
bench: build ## every benchmark figure (3 runs; scale: 1M files, ~20 GB free in /var/tmp), written to docs/BENCHMARKS.md with plots in docs/img/
	$(SUDO) $(GO) run ./tools/bench --runs 3 -scale-files 1000000 --out docs/BENCHMARKS.md

clean: ## remove build output
	rm -rf bin build $(DIST)
