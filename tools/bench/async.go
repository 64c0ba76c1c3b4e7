package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// asyncSyncFigures restarts nodeA with its directory in async mode and
// measures the same durable writes as syncFigures under `duet exec`: a
// durability call then returns at once while the lag is under max_lag.
func (b *bench) asyncSyncFigures(runs int) []Figure {
	calls, total, span := 2000, "256MiB", "64MiB"
	if b.quick {
		calls, total, span = 200, "32MiB", "8MiB"
	}
	cfg := filepath.Join(b.lab, "a.yaml")
	orig, err := os.ReadFile(cfg)
	if err != nil {
		fail(err.Error())
	}
	line := "    path: " + filepath.Join(b.lab, "a/data") + "\n"
	mod := strings.Replace(string(orig), line, line+"    mode: async\n", 1)
	if mod == string(orig) {
		fail("cannot set the async mode in " + cfg)
	}
	restart := func(conf string) {
		// nodeB first: nodeA must keep the role.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		b.must("stop", "a")
		if err := os.WriteFile(cfg, []byte(conf), 0o644); err != nil {
			fail(err.Error())
		}
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()
	}
	restart(mod)
	defer restart(string(orig))
	p50 := Figure{Name: fmt.Sprintf("4 KiB random write + fdatasync (in a %s file), p50 latency over %d calls: duet exec on an async directory / local", span, calls),
		Target: "(context)", Met: true, Unit: "ms",
		Note: "async: the call returns while the replication lag is under max_lag (2 s); what it costs is the supervisor's round trip"}
	p99 := Figure{Name: "same, p99 latency", Target: "(context)", Met: true, Unit: "ms"}
	seq := Figure{Name: "64 KiB sequential writes, fdatasync every 1 MiB (" + total + "): throughput duet exec on an async directory / local",
		Target: "(context)", Met: true, Unit: "MB/s"}
	for i := range runs {
		file := func(s string) string { return filepath.Join(b.lab, "a", "data", fmt.Sprintf("async-%s-%d", s, i)) }
		local := func(s string) string { return filepath.Join(b.localDir("a"), fmt.Sprintf("async-%s-%d", s, i)) }
		lat := []string{"-mode", "latency", "-size", "4096", "-count", strconv.Itoa(calls), "-span", span}
		thr := []string{"-mode", "throughput", "-size", "64K", "-every", "1MiB", "-total", total}
		var l, d syncResult
		pair(i, func() { l = b.syncbench("a", false, append(lat, "-file", local("lat"))...) },
			func() { d = b.syncbench("a", true, append(lat, "-file", file("duet"))...) })
		b.plots.addLatency("duet exec, async", d.SamplesMs)
		p50.add(l.P50Ms, d.P50Ms)
		p99.add(l.P99Ms, d.P99Ms)
		var lt, dt syncResult
		pair(i, func() { lt = b.syncbench("a", false, append(thr, "-file", local("seq"))...) },
			func() { dt = b.syncbench("a", true, append(thr, "-file", file("seq-duet"))...) })
		seq.add(lt.MBps, dt.MBps)
		b.waitSync()
		for _, f := range []string{local("lat"), file("duet"), local("seq"), file("seq-duet")} {
			os.Remove(f)
		}
	}
	return []Figure{p50, p99, seq}
}
