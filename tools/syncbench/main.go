// Command syncbench measures durable writes on one file and prints the
// result as one JSON object. The benchmarks run it twice side by side:
// plain, and under `duet exec` (each durability call waits for the peer).
//
//	syncbench -mode latency -file F -size 4096 -count 2000 [-span 64MiB]
//	    writes of -size bytes at increasing offsets (or, with -span, at
//	    random offsets within a prefilled span), each followed by
//	    fdatasync; reports per-call latency percentiles (write+fdatasync).
//	syncbench -mode throughput -file F -size 65536 -total 256MiB -every 1MiB
//	    sequential writes, fdatasync after every -every bytes; reports MB/s.
//
// With -cost nodeA=PID,nodeB=PID,exec=grandparent it also reports what
// each named process (parent: the one that started syncbench;
// grandparent: its parent, `duet exec` above its leader) and syncbench
// itself ("writer") used during the timed calls only (not
// the latency mode's prefill): CPU time, time waiting for a CPU, and
// context switches, summed over the threads (a thread that ended
// meanwhile is not counted at all).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/duet-ha/duet/tools/internal/cost"
	"github.com/duet-ha/duet/tools/internal/size"
	"golang.org/x/sys/unix"
)

// Result is what one run measured.
type Result struct {
	Mode    string  `json:"mode"`
	Calls   int     `json:"calls"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	MBps    float64 `json:"mb_per_s,omitempty"`
	P50Ms   float64 `json:"p50_ms,omitempty"`
	P99Ms   float64 `json:"p99_ms,omitempty"`
	MeanMs  float64 `json:"mean_ms,omitempty"`
	MaxMs   float64 `json:"max_ms,omitempty"`
	// SamplesMs are the latency mode's per-call latencies, sorted (for a
	// distribution plot).
	SamplesMs []float64 `json:"samples_ms,omitempty"`
	// Costs are the -cost processes' use during the timed calls.
	Costs []Cost `json:"costs,omitempty"`
}

// Cost is what one process used during the timed calls.
type Cost = cost.Proc

func main() {
	mode := flag.String("mode", "latency", "latency or throughput")
	file := flag.String("file", "", "file to write (created, truncated)")
	blockSize := flag.String("size", "4096", "bytes per write (suffixes K, M, KiB, MiB)")
	count := flag.Int("count", 1000, "latency mode: number of write+fdatasync calls")
	total := flag.String("total", "256MiB", "throughput mode: bytes to write")
	every := flag.String("every", "1MiB", "throughput mode: fdatasync after this many bytes")
	span := flag.String("span", "0", "latency mode: write at random offsets within this many bytes of a prefilled file (0: append)")
	costOf := flag.String("cost", "", "name=PID,... (PID parent or grandparent: syncbench's): report the CPU time and context switches of these processes, and of syncbench (writer), during the timed calls")
	flag.Parse()
	if *file == "" {
		fail("-file is required")
	}
	procs, err := parseCost(*costOf)
	check(err)
	bs, err := size.Parse(*blockSize)
	check(err)
	f, err := os.OpenFile(*file, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	check(err)
	defer f.Close()
	// Incompressible data, as a database's pages may be, from a pool
	// larger than a compressor's window so that no write repeats another.
	pool := make([]byte, max(bs, 32<<20))
	for i := range pool {
		pool[i] = byte(rand.Uint32())
	}
	fd := int(f.Fd())
	var r Result
	switch *mode {
	case "latency":
		var sp int64 // 0: appends (size.Parse wants a positive size)
		if *span != "0" {
			sp, err = size.Parse(*span)
			check(err)
		}
		r = latency(fd, pool, bs, *count, sp, procs)
	case "throughput":
		t, err := size.Parse(*total)
		check(err)
		e, err := size.Parse(*every)
		check(err)
		r = throughput(fd, pool, bs, t, e, procs)
	default:
		fail("unknown -mode " + *mode + " (latency or throughput)")
	}
	check(json.NewEncoder(os.Stdout).Encode(r))
}

// block returns the i-th write's bytes from the pool.
func block(pool []byte, bs int64, i int) []byte {
	n := int64(len(pool)) / bs
	o := (int64(i) % n) * bs
	return pool[o : o+bs]
}

func latency(fd int, pool []byte, bs int64, n int, span int64, procs []proc) Result {
	if span > 0 {
		// Prefill, so that the random writes overwrite allocated blocks
		// as a database's page writes do.
		for off := int64(0); off < span; off += bs {
			if _, err := unix.Pwrite(fd, block(pool, bs, int(off/bs)), off); err != nil {
				fail("prefill: " + err.Error())
			}
		}
		if err := unix.Fsync(fd); err != nil {
			fail("fsync: " + err.Error())
		}
	}
	lat := make([]float64, 0, n)
	before := snapshot(procs)
	start := time.Now()
	var off, written int64
	for i := 0; i < n; i++ {
		if span > 0 {
			off = rand.Int64N(span/bs) * bs
		}
		t := time.Now()
		if _, err := unix.Pwrite(fd, block(pool, bs, i), off); err != nil {
			fail("write: " + err.Error())
		}
		if err := unix.Fdatasync(fd); err != nil {
			fail("fdatasync: " + err.Error())
		}
		lat = append(lat, float64(time.Since(t).Nanoseconds())/1e6)
		written += bs
		if span == 0 {
			off += bs
		}
	}
	el := time.Since(start).Seconds()
	costs := costSince(procs, before)
	slices.Sort(lat)
	var sum float64
	for _, v := range lat {
		sum += v
	}
	pct := func(p float64) float64 { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	return Result{Mode: "latency", Calls: n, Bytes: written, Seconds: el, P50Ms: pct(0.50), P99Ms: pct(0.99),
		MeanMs: sum / float64(n), MaxMs: lat[len(lat)-1], SamplesMs: lat, Costs: costs}
}

func throughput(fd int, pool []byte, bs, total, every int64, procs []proc) Result {
	before := snapshot(procs)
	start := time.Now()
	var off, since int64
	calls := 0
	for i := 0; off < total; i++ {
		if _, err := unix.Pwrite(fd, block(pool, bs, i), off); err != nil {
			fail("write: " + err.Error())
		}
		off += bs
		since += bs
		if since >= every || off >= total {
			if err := unix.Fdatasync(fd); err != nil {
				fail("fdatasync: " + err.Error())
			}
			calls++
			since = 0
		}
	}
	el := time.Since(start).Seconds()
	return Result{Mode: "throughput", Calls: calls, Bytes: off, Seconds: el, MBps: float64(off) / el / 1e6, Costs: costSince(procs, before)}
}

// proc is a process whose use -cost reports.
type proc struct {
	name string
	pid  int
}

// parseCost reads -cost's name=PID list; syncbench itself is added as
// "writer".
func parseCost(s string) ([]proc, error) {
	if s == "" {
		return nil, nil
	}
	var ps []proc
	for _, kv := range strings.Split(s, ",") {
		name, v, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			return nil, fmt.Errorf("-cost %q: want name=PID,... (PID a number, parent or grandparent)", s)
		}
		var pid int
		switch v {
		case "parent":
			pid = os.Getppid()
		case "grandparent":
			var err error
			if pid, err = parentOf(os.Getppid()); err != nil {
				return nil, fmt.Errorf("-cost %s: %w", name, err)
			}
		default:
			n, err := strconv.Atoi(v)
			if err != nil || n <= 0 {
				return nil, fmt.Errorf("-cost %q: %q is not a process number", s, v)
			}
			pid = n
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return nil, fmt.Errorf("-cost: process %s (%d): %w", name, pid, err)
		}
		ps = append(ps, proc{name, pid})
	}
	return append(ps, proc{"writer", os.Getpid()}), nil
}

// parentOf is pid's parent process.
func parentOf(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 2 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, s)
	}
	return strconv.Atoi(f[1])
}

// snapshot is each process's threads' use so far, by thread.
func snapshot(ps []proc) []map[string]Cost {
	var ss []map[string]Cost
	for _, p := range ps {
		ts, err := use(p.pid)
		if err != nil {
			fail(fmt.Sprintf("-cost %s: %v", p.name, err))
		}
		ss = append(ss, ts)
	}
	return ss
}

// costSince is each process's use since before: a thread's since its
// first snapshot, or since it began if it began meanwhile. A thread that
// ended meanwhile is not counted at all (a whole-process difference would
// take its earlier use away from the others').
func costSince(ps []proc, before []map[string]Cost) []Cost {
	return diffCosts(ps, before, snapshot(ps))
}

// diffCosts is costSince between two snapshots.
func diffCosts(ps []proc, before, after []map[string]Cost) []Cost {
	var cs []Cost
	for i, p := range ps {
		c := Cost{Name: p.name}
		for tid, a := range after[i] {
			b := before[i][tid] // zero for a thread begun meanwhile
			if a.Switches < b.Switches {
				b = Cost{} // the thread number was reused
			}
			c.CPUSeconds += a.CPUSeconds - b.CPUSeconds
			c.WaitSeconds += a.WaitSeconds - b.WaitSeconds
			c.Switches += a.Switches - b.Switches
		}
		cs = append(cs, c)
	}
	return cs
}

// use is what each of a process's threads used so far: time on a CPU,
// time runnable but waiting for one (both from schedstat), and context
// switches.
func use(pid int) (map[string]Cost, error) {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return nil, err
	}
	ts := map[string]Cost{}
	for _, t := range tasks {
		dir := fmt.Sprintf("/proc/%d/task/%s/", pid, t.Name())
		ss, err1 := os.ReadFile(dir + "schedstat")
		st, err2 := os.ReadFile(dir + "status")
		if err1 != nil || err2 != nil {
			continue // the thread ended
		}
		var run, wait uint64
		if _, err := fmt.Sscan(string(ss), &run, &wait); err != nil {
			return nil, fmt.Errorf("%sschedstat: %v", dir, err)
		}
		c := Cost{CPUSeconds: float64(run) / 1e9, WaitSeconds: float64(wait) / 1e9}
		for _, line := range strings.Split(string(st), "\n") {
			k, v, _ := strings.Cut(line, ":")
			if k == "voluntary_ctxt_switches" || k == "nonvoluntary_ctxt_switches" {
				n, _ := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				c.Switches += n
			}
		}
		ts[t.Name()] = c
	}
	return ts, nil
}

func check(err error) {
	if err != nil {
		fail(err.Error())
	}
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "syncbench:", msg)
	os.Exit(1)
}
