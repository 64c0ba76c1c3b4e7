// Command bench measures duet in the lab, each figure as a ratio against a
// baseline measured in the same run, and writes a Markdown report.
//
//	go run ./tools/bench [--quick] [--runs 3] [-only scale] [-scale-files 1000000] [--out docs/BENCHMARKS.md] [--json]
//
// Needs root (the lab), fio and rsync.
package main

import (
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	mrand "math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/tools/internal/cost"
)

type bench struct {
	lab, script, bin string
	syncbenchBin     string
	quick            bool
	plots            plots
	// stages sums, per workload, node and stage, what the daemons timed
	// during the sync runs under duet exec (duet status --latency).
	stages []stageTable
	// lsyncdMissed are the deletes lsyncd missed (waitSame).
	lsyncdMissed []string
}

// Figure is one reported measurement.
type Figure struct {
	Name     string    `json:"name"`
	Ratio    []float64 `json:"ratio"` // per run
	Target   string    `json:"target"`
	Met      bool      `json:"met"`
	Baseline []float64 `json:"baseline"`
	Measured []float64 `json:"measured"`
	Unit     string    `json:"unit"`
	Note     string    `json:"note"`
}

// figureNames are the figures -only chooses from, in the order they run.
var figureNames = []string{"capture", "wire", "small", "sync", "async", "lag", "resync", "lsyncd", "mariadb", "nfs", "tls", "scale", "failover"}

func main() {
	out := flag.String("out", "", "write the Markdown report here")
	asJSON := flag.Bool("json", false, "print the figures as JSON")
	quick := flag.Bool("quick", false, "small sizes, one run: checks the tooling, not the numbers")
	runs := flag.Int("runs", 5, "runs per figure (min/median/max reported)")
	only := flag.String("only", strings.Join(figureNames, ","), "figures to measure, comma separated: "+strings.Join(figureNames, ", "))
	scaleFiles := flag.Int("scale-files", 1_000_000, "files in the scale figure's tree (8,000 with --quick unless given)")
	flag.Parse()
	want := map[string]bool{}
	for _, k := range strings.Split(*only, ",") {
		k = strings.TrimSpace(k)
		if !slices.Contains(figureNames, k) {
			fail(fmt.Sprintf("-only: unknown figure %q (%s)", k, strings.Join(figureNames, ", ")))
		}
		want[k] = true
	}
	if *quick && !flagGiven("scale-files") {
		*scaleFiles = 8_000
	}
	if *scaleFiles < 100 {
		fail(fmt.Sprintf("-scale-files %d: give at least 100", *scaleFiles))
	}
	if os.Geteuid() != 0 {
		fail("needs root: the lab uses namespaces and loop devices")
	}
	if _, err := exec.LookPath("fio"); err != nil {
		fail("fio not installed (apt-get install fio)")
	}
	root, _ := os.Getwd()
	b := &bench{lab: "/var/tmp/duet-bench", script: filepath.Join(root, "tools/lab/lab.sh"),
		bin: os.Getenv("DUET_BIN"), quick: *quick}
	if b.bin == "" {
		b.bin = filepath.Join(root, "bin/duet")
	}
	if *quick {
		*runs = 1
	}
	// The scale figure's tree on both nodes, with inodes for every file:
	// lab.sh sizes the loop filesystems from DUET_LAB_SIZE.
	if want["scale"] && os.Getenv("DUET_LAB_SIZE") == "" {
		os.Setenv("DUET_LAB_SIZE", scaleLabSize(*scaleFiles))
	}
	defer b.sh("down")
	b.must("up")
	// The daemons' logs of an earlier run: the failover figure counts
	// the peers declared lost in this one.
	for _, h := range []string{"a", "b"} {
		os.Remove(filepath.Join(b.lab, h+".log"))
	}
	b.must("start", "b")
	b.must("start", "a")
	b.waitSync()

	var figs []Figure
	if want["capture"] {
		figs = append(figs, b.throughput(*runs)...)
	}
	if want["wire"] {
		figs = append(figs, b.wireRatio(*runs))
	}
	if want["small"] {
		figs = append(figs, b.smallFiles(*runs)...)
	}
	if want["sync"] {
		figs = append(figs, b.syncFigures(*runs)...)
	}
	if want["async"] {
		if b.syncbenchBin == "" {
			b.buildSyncbench()
		}
		figs = append(figs, b.asyncSyncFigures(*runs)...)
	}
	if want["lag"] {
		figs = append(figs, b.asyncLag(*runs)...)
	}
	if want["resync"] {
		figs = append(figs, b.resyncFigures(*runs)...)
	}
	if want["lsyncd"] {
		figs = append(figs, b.lsyncdFigures(*runs)...)
	}
	if want["mariadb"] {
		figs = append(figs, b.mariadbFigures(*runs)...)
	}
	if want["nfs"] {
		figs = append(figs, b.nfsFigures(*runs)...)
	}
	if want["tls"] {
		figs = append(figs, b.tlsFigures(*runs)...)
	}
	if want["scale"] {
		figs = append(figs, b.scaleFigures(*runs, *scaleFiles)...)
	}
	if want["failover"] {
		// At least 10 kills for the published figure.
		n := max(*runs, 10)
		if b.quick {
			n = 2
		}
		figs = append(figs, b.failoverFigure(n))
	}
	b.sh("down") // before anything below may exit
	if *asJSON {
		// A figure that could not be measured (NaN) fails the encoding:
		// it is reported, not hidden.
		if err := json.NewEncoder(os.Stdout).Encode(figs); err != nil {
			fail("encoding the figures: " + err.Error())
		}
	}
	report := b.markdown(figs, *runs)
	if *out != "" {
		dir := filepath.Join(filepath.Dir(*out), "img")
		files, err := b.plots.write(dir)
		if err != nil {
			fail("plots: " + err.Error())
		}
		if len(files) > 0 {
			report += "\n## Plots\n\n"
			for _, f := range files {
				rel, _ := filepath.Rel(filepath.Dir(*out), f)
				report += fmt.Sprintf("![%s](%s)\n\n", strings.TrimSuffix(filepath.Base(f), ".png"), rel)
			}
		}
	}
	if !*asJSON {
		fmt.Print(report)
	}
	if *out != "" {
		// Commentary written by hand after the figures is kept.
		if old, err := os.ReadFile(*out); err == nil {
			if i := strings.Index(string(old), notesHeading); i >= 0 {
				report += "\n" + string(old[i:])
			}
		}
		if err := os.WriteFile(*out, []byte(report), 0o644); err != nil {
			fail(err.Error())
		}
	}
}

// notesHeading starts the hand-written part of the report, kept when the
// figures are measured again.
const notesHeading = "## Reading these figures"

// flagGiven says whether the command line set the flag.
func flagGiven(name string) bool {
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == name })
	return given
}

func fail(msg string) {
	fmt.Fprintln(os.Stderr, "bench:", msg)
	os.Exit(1)
}

func (b *bench) sh(args ...string) (string, error) {
	cmd := exec.Command(b.script, args...)
	cmd.Env = append(os.Environ(), "DUET_LAB="+b.lab, "DUET_BIN="+b.bin)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func (b *bench) must(args ...string) string {
	out, err := b.sh(args...)
	if err != nil {
		b.sh("down")
		fail(fmt.Sprintf("lab %v: %v\n%s", args, err, out))
	}
	return out
}

func (b *bench) waitSync() { b.waitSyncFor(300 * time.Second) }

// waitSyncFor waits until nodeA serves and its peer has every change, up
// to limit.
func (b *bench) waitSyncFor(limit time.Duration) {
	b.waitServing()
	b.must("duet", "a", "status", "--wait-sync", limit.String())
}

// stopPair stops both daemons cleanly, nodeB first: a primary stopped
// next to an in-sync peer hands its role over, and nodeA must keep it.
func (b *bench) stopPair() {
	b.must("stop", "b")
	b.waitState("a", "ALONE")
	b.must("stop", "a")
}

// startPair starts nodeA, then nodeB, and waits up to limit until they
// are in sync.
func (b *bench) startPair(limit time.Duration) {
	b.must("start", "a")
	b.must("start", "b")
	b.waitSyncFor(limit)
}

// pid is the pid of host's daemon, from lab.sh's pid file: lab.sh starts
// it with ip netns exec, which execs duet in the same process.
func (b *bench) pid(host string) int {
	s, err := os.ReadFile(filepath.Join(b.lab, host+".pid"))
	if err != nil {
		fail(fmt.Sprintf("node%s's daemon: %v (is it running?)", strings.ToUpper(host), err))
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(s)))
	if err != nil {
		fail(fmt.Sprintf("node%s's pid file: %v", strings.ToUpper(host), err))
	}
	return pid
}

// waitState waits until host is in state.
func (b *bench) waitState(host, state string) {
	for i := 0; i < 600; i++ {
		var s node.Status
		out, err := b.sh("duet", host, "status", "--output", "json")
		if err == nil && json.Unmarshal([]byte(out), &s) == nil && s.State == state {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	fail(host + " is not " + state + " after 60 s")
}

// waitServing waits until nodeA is the primary: every figure measures
// writes on nodeA's tree.
func (b *bench) waitServing() {
	for i := 0; i < 600; i++ {
		var s node.Status
		out, err := b.sh("duet", "a", "status", "--output", "json")
		if err == nil && json.Unmarshal([]byte(out), &s) == nil && (s.State == "PRIM" || s.State == "ALONE") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	fail("nodeA does not serve after 60 s")
}

// latencies is what both daemons have timed of durability calls so far,
// keyed "nodeA stage", nodeA's then nodeB's in stage order.
func (b *bench) latencies() []latency.StageCounts {
	var all []latency.StageCounts
	for _, h := range []string{"a", "b"} {
		var s node.Status
		out := b.must("duet", h, "status", "--output", "json")
		if err := json.Unmarshal([]byte(out), &s); err != nil {
			fail("status: " + out)
		}
		for _, sc := range s.Latency {
			all = append(all, latency.StageCounts{Stage: "node" + strings.ToUpper(h) + " " + sc.Stage, Counts: sc.Counts})
		}
	}
	return all
}

// stageTable is what the daemons timed during one workload's runs.
type stageTable struct {
	workload string
	counts   map[string]latency.Counts // by "nodeA stage"
	order    []string
	// What each process used during the timed calls of syncbench's
	// runs (addCosts), summed over the runs, and the calls.
	costs     map[string]cost.Proc
	costOrder []string
	calls     int
}

// addCosts adds what a supervised syncbench run reported of its timed
// calls' cost to workload's table.
func (b *bench) addCosts(workload string, r syncResult) {
	for i := range b.stages {
		t := &b.stages[i]
		if t.workload != workload || len(r.Costs) == 0 {
			continue
		}
		if t.costs == nil {
			t.costs = map[string]cost.Proc{}
		}
		t.calls += r.Calls
		for _, c := range r.Costs {
			old, ok := t.costs[c.Name]
			if !ok {
				t.costOrder = append(t.costOrder, c.Name)
			}
			old.Name = c.Name
			old.CPUSeconds += c.CPUSeconds
			old.WaitSeconds += c.WaitSeconds
			old.Switches += c.Switches
			t.costs[c.Name] = old
		}
	}
}

// timed runs f, a workload's run under duet exec, and adds what the
// daemons timed meanwhile to the workload's table.
func (b *bench) timed(workload string, f func()) {
	settle()
	before := b.latencies()
	f()
	after := b.latencies()
	var t *stageTable
	for i := range b.stages {
		if b.stages[i].workload == workload {
			t = &b.stages[i]
		}
	}
	if t == nil {
		b.stages = append(b.stages, stageTable{workload: workload, counts: map[string]latency.Counts{}})
		t = &b.stages[len(b.stages)-1]
	}
	t.add(before, after)
}

// add adds what was timed between two latencies snapshots.
func (t *stageTable) add(before, after []latency.StageCounts) {
	for _, sc := range after {
		k, d := sc.Stage, sc.Counts
		for _, p := range before {
			if p.Stage == k {
				d = d.Minus(p.Counts)
			}
		}
		if d.Total() == 0 {
			continue
		}
		if old, ok := t.counts[k]; ok {
			d = d.Plus(old)
		} else {
			t.order = append(t.order, k)
		}
		t.counts[k] = d
	}
}

func (b *bench) status() node.Status {
	var s node.Status
	out := b.must("duet", "a", "status", "--output", "json")
	if err := json.Unmarshal([]byte(out), &s); err != nil || len(s.Dirs) == 0 {
		fail("status: " + out)
	}
	return s
}

// fioFile is the file the throughput rows write over.
func (b *bench) fioFile() string { return filepath.Join(b.lab, "a/data/fio.dat") }

// fio runs a buffered sequential write of 64 KiB blocks over the file
// the throughput rows laid out on nodeA's filesystem, and returns bytes
// per second.
func (b *bench) fio(size string) float64 {
	// Start every measurement from the same state: no dirty pages of an
	// earlier run being written back (through the loop device and the
	// host's own cache) while this one runs. fio drops the file's cached
	// pages before it writes (its invalidate option), so each run fills
	// the page cache anew, over blocks already allocated. A new file each
	// time (allocated, and the last one's removed just before) made the
	// same run range from 1.3 to 6.4 GB/s, wider than the 5 % the figure
	// must resolve; written over, it varies by 1 or 2 %.
	exec.Command("sync").Run()
	out, err := exec.Command("fio", "--name=seqwrite", "--filename="+b.fioFile(), "--rw=write", "--bs=64k",
		"--size="+size, "--ioengine=psync", "--output-format=json").Output()
	if err != nil {
		fail(fmt.Sprintf("fio: %v\n%s", err, out))
	}
	var r struct {
		Jobs []struct {
			Write struct {
				BW float64 `json:"bw_bytes"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &r); err != nil || len(r.Jobs) == 0 {
		fail("fio output: " + string(out))
	}
	return r.Jobs[0].Write.BW
}

// fioRepeats is how many fio runs make each quarter of a capture run
// (A-B-B-A): the capture side is the mean of twice as many.
const fioRepeats = 3

// fioMean is the mean of n fio runs.
func (b *bench) fioMean(size string, n int) float64 {
	sum := 0.0
	for range n {
		sum += b.fio(size)
	}
	return sum / float64(n)
}

// throughput alternates runs without duet on nodeA with runs where duet
// captures only (nodeB down: records are journaled, nothing is read back)
// and runs where it captures and replicates to nodeB.
func (b *bench) throughput(runs int) []Figure {
	size := "1g"
	if b.quick {
		size = "64m"
	}
	capOnly := Figure{Name: "capture overhead: buffered sequential write over a laid-out file (fio, 64 KiB blocks, " + size + "), duet capturing / no duet",
		Target: "≥ 0.95", Unit: "MB/s", Note: fmt.Sprintf("nodeB stopped: duet captures and journals, ships nothing; each run A-B-B-A, each side the mean of its %d fio runs", 2*fioRepeats)}
	repl := Figure{Name: "same, duet capturing and replicating / no duet",
		Target: "(none yet)", Met: true, Unit: "MB/s",
		Note: "both nodes share this machine's CPUs and disk: nodeB's applier and syncfs compete with fio"}
	// The file the runs write over, made (and replicated) once.
	if out, err := exec.Command("fio", "--name=layout", "--filename="+b.fioFile(), "--rw=write", "--bs=1m",
		"--size="+size, "--ioengine=psync").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("fio: %v\n%s", err, out))
	}
	defer func() {
		os.Remove(b.fioFile())
		b.waitSync()
	}()
	b.waitSync()
	for i := 0; i < runs; i++ {
		// nodeB first: a primary stopped next to an in-sync peer hands
		// its role over, and nodeA must be the one that serves next.
		b.must("stop", "b")
		b.waitState("a", "ALONE")
		b.must("stop", "a")
		// A-B-B-A: a drift of the machine over the run (the host's
		// other guests, its cache) weighs on both alike. Each side is
		// the mean of several fio runs: one lasts 0.2 to 0.5 s, and
		// single runs spread by more than the 5 % the row resolves.
		base1 := b.fioMean(size, fioRepeats)
		b.must("start", "a")
		b.waitServing()
		capt := b.fioMean(size, 2*fioRepeats)
		b.must("stop", "a")
		base := (base1 + b.fioMean(size, fioRepeats)) / 2
		b.must("start", "a")
		b.waitServing()
		b.must("start", "b")
		b.waitSync()
		with := b.fio(size)
		b.waitSync()
		for _, x := range []struct {
			f *Figure
			v float64
		}{{&capOnly, capt}, {&repl, with}} {
			x.f.Baseline = append(x.f.Baseline, base/1e6)
			x.f.Measured = append(x.f.Measured, x.v/1e6)
			x.f.Ratio = append(x.f.Ratio, x.v/base)
		}
	}
	capOnly.Met = median(capOnly.Ratio) >= 0.95
	b.plots.bars = append(b.plots.bars, barChart{file: "throughput.png",
		title: "buffered sequential write (fio, 64 KiB), median of the runs", unit: "MB/s",
		labels: []string{"no duet", "duet capturing", "duet replicating"},
		values: []float64{median(capOnly.Baseline), median(capOnly.Measured), median(repl.Measured)}})
	return []Figure{capOnly, repl}
}

func vethTX(b *bench) uint64 {
	out := b.must("exec", "a", "cat", "/sys/class/net/eth0/statistics/tx_bytes")
	n, _ := strconv.ParseUint(strings.TrimSpace(out), 10, 64)
	return n
}

// wireRatio makes small random incompressible writes into a large file and
// compares bytes on the wire with bytes changed.
func (b *bench) wireRatio(runs int) Figure {
	fileSize := int64(256 << 20)
	writes := 4000
	if b.quick {
		fileSize, writes = 16<<20, 500
	}
	const blk = 4096
	f := Figure{Name: fmt.Sprintf("wire bytes / changed bytes, %d random %d B incompressible writes into a %d MiB file",
		writes, blk, fileSize>>20), Target: "≤ 1.05", Unit: "bytes"}
	path := filepath.Join(b.lab, "a/data/big.dat")
	buf := make([]byte, 1<<20)
	fh, err := os.Create(path)
	if err != nil {
		fail(err.Error())
	}
	for off := int64(0); off < fileSize; off += int64(len(buf)) {
		rand.Read(buf)
		fh.WriteAt(buf, off)
	}
	fh.Close()
	b.waitSync()
	rng := mrand.New(mrand.NewSource(1))
	var veth []float64
	for i := 0; i < runs; i++ {
		st0, tx0 := b.status(), vethTX(b)
		fh, _ := os.OpenFile(path, os.O_WRONLY, 0)
		data := make([]byte, blk)
		for w := 0; w < writes; w++ {
			rand.Read(data)
			fh.WriteAt(data, rng.Int63n(fileSize/blk)*blk)
		}
		fh.Close()
		b.waitSync()
		st1, tx1 := b.status(), vethTX(b)
		changed := float64(writes * blk)
		wire := float64(st1.Dirs[0].WireBytes - st0.Dirs[0].WireBytes)
		f.Baseline = append(f.Baseline, changed)
		f.Measured = append(f.Measured, wire)
		f.Ratio = append(f.Ratio, wire/changed)
		veth = append(veth, float64(tx1-tx0)/changed)
	}
	os.Remove(path)
	f.Met = median(f.Ratio) <= 1.05
	f.Note = fmt.Sprintf("duet frame bytes (headers, op encoding, zstd) over bytes written; counting every byte nodeA's veth sent (TCP/IP, acks, status): %s",
		spread(veth))
	return f
}

// settle writes back every dirty page and drops the caches: no writeback
// of an earlier measurement (through the loop devices and the host's own
// cache of their backing files) runs during the next one.
func settle() {
	exec.Command("sync").Run()
	os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

// buildSyncbench builds tools/syncbench for the lab hosts.
func (b *bench) buildSyncbench() {
	b.syncbenchBin = filepath.Join(os.TempDir(), "duet-bench-syncbench")
	if out, err := exec.Command("go", "build", "-o", b.syncbenchBin, "./tools/syncbench").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("building syncbench: %v\n%s", err, out))
	}
}

// syncbench runs tools/syncbench on nodeA's filesystem, plain or under
// `duet exec`, and returns what it printed.
type syncResult struct {
	Calls     int       `json:"calls"`
	P50Ms     float64   `json:"p50_ms"`
	P99Ms     float64   `json:"p99_ms"`
	MeanMs    float64   `json:"mean_ms"`
	MBps      float64   `json:"mb_per_s"`
	SamplesMs []float64 `json:"samples_ms"`
	// Costs: what the daemons, `duet exec` and the writer used during
	// a supervised run's timed calls (syncbench -cost).
	Costs []cost.Proc `json:"costs"`
}

func (b *bench) syncbench(host string, supervised bool, args ...string) syncResult {
	settle()
	return b.syncbenchNow(host, supervised, args...)
}

// syncbenchNow is syncbench without settling first: for runs side by side.
func (b *bench) syncbenchNow(host string, supervised bool, args ...string) syncResult {
	cmd := []string{"exec", host}
	if supervised {
		cmd = append(cmd, b.bin, "exec", "--config", filepath.Join(b.lab, host+".yaml"), "--")
	}
	cmd = append(cmd, b.syncbenchBin)
	if supervised {
		// `duet exec` runs a leader process (barrier.RunChild), whose
		// child is syncbench.
		cmd = append(cmd, "-cost", fmt.Sprintf("nodeA daemon=%d,nodeB daemon=%d,duet exec=grandparent", b.pid("a"), b.pid("b")))
	}
	cmd = append(cmd, args...)
	out := b.must(cmd...)
	var r syncResult
	if err := json.Unmarshal([]byte(lastLine(out)), &r); err != nil {
		fail(fmt.Sprintf("syncbench output: %v\n%s", err, out))
	}
	return r
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// syncFigures measures durable writes side by side, local then under
// `duet exec` (each fdatasync waits until the peer has the data durably):
// the latency of 4 KiB writes each followed by fdatasync, and the
// throughput of 64 KiB sequential writes with fdatasync every MiB.
func (b *bench) syncFigures(runs int) []Figure {
	calls, total, span := 2000, "256MiB", "64MiB"
	if b.quick {
		calls, total, span = 200, "32MiB", "8MiB"
	}
	b.buildSyncbench()
	p50 := Figure{Name: fmt.Sprintf("4 KiB random write + fdatasync (in a %s file), p50 latency over %d calls: duet exec / local", span, calls),
		Target: "≤ 2.0", Unit: "ms",
		Note: "each fdatasync under duet exec returns once the peer has applied and synced the write; the supervisor flushes the local file meanwhile"}
	p99 := Figure{Name: "same, p99 latency", Target: "≤ 2.5", Unit: "ms"} // issue 16: p99 ≤ 2.5
	app := Figure{Name: fmt.Sprintf("4 KiB appends + fdatasync (a new file), p50 latency over %d calls: duet exec / local", calls),
		Target: "≤ 2.0", Unit: "ms",
		Note: "a log's shape (a database's binary log): each write grows the file, and the capture announces the bytes ahead of its end"}
	seq := Figure{Name: "64 KiB sequential writes, fdatasync every 1 MiB (" + total + "): throughput duet exec / local",
		Target: "≥ 0.8", Unit: "MB/s",
		Note: "incompressible data (zstd is skipped for it)"}
	both := Figure{Name: "context: the same writer on nodeA and nodeB at once, per writer / alone",
		Target: "(context)", Met: true, Unit: "MB/s",
		Note: "both lab filesystems are loop devices on one virtual disk: a synchronous replica halves what each writer gets, whatever duet does"}
	for i := 0; i < runs; i++ {
		// duet's files in the replicated tree; the baselines outside it on
		// the same filesystem, so that duet neither captures nor ships
		// them while they are timed.
		file := func(h, s string) string { return filepath.Join(b.lab, h, "data", fmt.Sprintf("sync-%s-%d", s, i)) }
		local := func(h, s string) string { return filepath.Join(b.localDir(h), fmt.Sprintf("sync-%s-%d", s, i)) }
		lat := []string{"-mode", "latency", "-size", "4096", "-count", strconv.Itoa(calls), "-span", span}
		thr := []string{"-mode", "throughput", "-size", "64K", "-every", "1MiB", "-total", total}
		// A-B-B-A: the baseline first in even runs, second in odd ones.
		var l, d, lt, dt syncResult
		pair(i, func() { l = b.syncbench("a", false, append(lat, "-file", local("a", "lat"))...) },
			func() {
				b.timed("4 KiB random write + fdatasync", func() { d = b.syncbenchNow("a", true, append(lat, "-file", file("a", "duet"))...) })
				b.addCosts("4 KiB random write + fdatasync", d)
			})
		b.plots.addLatency("local", l.SamplesMs)
		b.plots.addLatency("duet exec, sync", d.SamplesMs)
		p50.add(l.P50Ms, d.P50Ms)
		p99.add(l.P99Ms, d.P99Ms)
		appLat := []string{"-mode", "latency", "-size", "4096", "-count", strconv.Itoa(calls)} // no -span: appends
		var la, da syncResult
		pair(i, func() { la = b.syncbench("a", false, append(appLat, "-file", local("a", "app"))...) },
			func() {
				b.timed("4 KiB appends + fdatasync", func() { da = b.syncbenchNow("a", true, append(appLat, "-file", file("a", "app-duet"))...) })
				b.addCosts("4 KiB appends + fdatasync", da)
			})
		app.add(la.P50Ms, da.P50Ms)
		pair(i, func() { lt = b.syncbench("a", false, append(thr, "-file", local("a", "seq"))...) },
			func() {
				b.timed("64 KiB sequential writes, fdatasync every 1 MiB", func() {
					dt = b.syncbenchNow("a", true, append(thr, "-file", file("a", "seq-duet"))...)
				})
				b.addCosts("64 KiB sequential writes, fdatasync every 1 MiB", dt)
			})
		seq.add(lt.MBps, dt.MBps)
		// Two local writers at once, one per lab filesystem, outside the
		// replicated trees.
		settle()
		done := make(chan syncResult)
		go func() { done <- b.syncbenchNow("b", false, append(thr, "-file", local("b", "seq-both"))...) }()
		a := b.syncbenchNow("a", false, append(thr, "-file", local("a", "seq-both"))...)
		bb := <-done
		both.add(lt.MBps, (a.MBps+bb.MBps)/2)
		b.waitSync()
		for _, f := range []string{local("a", "lat"), file("a", "duet"), local("a", "app"), file("a", "app-duet"), local("a", "seq"), file("a", "seq-duet"), local("a", "seq-both"), local("b", "seq-both")} {
			os.Remove(f)
		}
	}
	p50.Met = median(p50.Ratio) <= 2.0
	p99.Met = median(p99.Ratio) <= 2.0
	seq.Met = median(seq.Ratio) >= 0.8
	app.Met = median(app.Ratio) <= 2.0
	return []Figure{p50, p99, app, seq, both}
}

// localDir is a directory of host's lab filesystem outside the
// replicated tree: a baseline written there is neither captured nor
// shipped, on the same disk as what duet replicates.
func (b *bench) localDir(host string) string {
	d := filepath.Join(b.lab, host, "bench-local")
	if err := os.MkdirAll(d, 0o755); err != nil {
		fail(err.Error())
	}
	return d
}

// pair runs base and measured in the order A-B-B-A over the runs: the
// baseline first in even runs, second in odd ones, so that whatever
// drifts during a run (page cache, the loop devices' backing file) does
// not always favour the same side.
func pair(run int, base, measured func()) {
	if run%2 == 0 {
		base()
		measured()
	} else {
		measured()
		base()
	}
}

func (f *Figure) add(base, measured float64) {
	f.Baseline = append(f.Baseline, base)
	f.Measured = append(f.Measured, measured)
	f.Ratio = append(f.Ratio, measured/base)
}

// asyncLag runs a steady buffered writer that duet does not supervise
// (fio, rate-limited) and reads the replication lag histogram of nodeA
// before and after: the p99 of the lag of the batches acknowledged meanwhile.
func (b *bench) asyncLag(runs int) []Figure {
	secs := "10"
	if b.quick {
		secs = "3"
	}
	f := Figure{Name: "async replication lag p99 under a steady 20 MB/s buffered writer (fio, " + secs + " s), over the 50 ms target",
		Target: "< 1.0", Unit: "ms",
		Note: "lag of each acknowledged batch, from the capture of its oldest change to the peer's ack; the histogram's bucket bound at or above the p99 (buckets 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 40, 50, 75, 100 ms…), so an upper bound of the p99; baseline is the 50 ms target"}
	p50 := Figure{Name: "same, p50 of the lag, over the 50 ms target", Target: "(context)", Met: true, Unit: "ms"}
	file := filepath.Join(b.lab, "a/data/lag.dat")
	for i := 0; i < runs; i++ {
		before := b.status().LagHistogram
		fio := exec.Command("fio", "--name=steady", "--filename="+file, "--rw=write", "--bs=64k",
			"--size=1g", "--rate=20m", "--time_based", "--runtime="+secs, "--ioengine=psync", "--output-format=json")
		var out strings.Builder
		fio.Stdout, fio.Stderr = &out, &out
		if err := fio.Start(); err != nil {
			fail("fio: " + err.Error())
		}
		done := make(chan error, 1)
		go func() { done <- fio.Wait() }()
		// The lag over time, sampled from the status while fio runs (the
		// first run's, for the plot).
		start := time.Now()
		var series []lagSample
	sample:
		for {
			select {
			case err := <-done:
				if err != nil {
					fail(fmt.Sprintf("fio: %v\n%s", err, out.String()))
				}
				break sample
			case <-time.After(250 * time.Millisecond):
				series = append(series, lagSample{time.Since(start).Seconds(), b.status().LagMs})
			}
		}
		if i == 0 {
			b.plots.lagSeries = series
		}
		b.waitSync()
		after := b.status().LagHistogram
		p := after.Quantile(0.99, before)
		b.plots.lagBounds = after.BoundsMs
		b.plots.lagCounts = make([]uint64, len(after.Counts))
		for i := range after.Counts {
			b.plots.lagCounts[i] = after.Counts[i]
			if i < len(before.Counts) {
				b.plots.lagCounts[i] -= before.Counts[i]
			}
		}
		f.Baseline = append(f.Baseline, 50)
		f.Measured = append(f.Measured, p)
		f.Ratio = append(f.Ratio, p/50)
		p50.add(50, after.Quantile(0.5, before))
		os.Remove(file)
	}
	f.Met = median(f.Ratio) < 1
	return []Figure{f, p50}
}

// noTarget: a row that gives context and has no target to meet.
func noTarget(target string) bool {
	return target == "n/a" || strings.HasPrefix(target, "(")
}

// crossesTarget reports whether a target of the form "≥ x", "≤ x" or
// "< x" is met by some of ratios and missed by others.
func crossesTarget(target string, ratios []float64) bool {
	var op string
	var x float64
	for _, o := range []string{"≥", "≤", "<"} {
		if rest, ok := strings.CutPrefix(target, o); ok {
			f := strings.Fields(rest)
			if len(f) == 0 {
				return false
			}
			v, err := strconv.ParseFloat(f[0], 64)
			if err != nil {
				return false
			}
			op, x = o, v
		}
	}
	met, missed := false, false
	for _, r := range ratios {
		ok := op == "≥" && r >= x || op == "≤" && r <= x || op == "<" && r < x
		met, missed = met || ok, missed || !ok
	}
	return op != "" && met && missed
}

func median(v []float64) float64 { return quantile(v, 0.5) }

// quantile is the value of v at rank q (0 to 1), the nearest rank below.
func quantile(v []float64, q float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return math.NaN()
	}
	return s[min(int(q*float64(len(s))), len(s)-1)]
}

func spread(v []float64) string {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 1 {
		return fmt.Sprintf("%.3f", s[0])
	}
	return fmt.Sprintf("%.3f / %.3f / %.3f", s[0], median(s), s[len(s)-1])
}

func (b *bench) markdown(figs []Figure, runs int) string {
	var w strings.Builder
	host, _ := os.Hostname()
	kernel, _ := exec.Command("uname", "-r").Output()
	fmt.Fprintf(&w, "# duet benchmarks\n\nProduced by `make bench` (`go run ./tools/bench --runs 3 -scale-files 1000000 --out docs/BENCHMARKS.md`")
	if b.quick {
		fmt.Fprintf(&w, " --quick")
	}
	fmt.Fprintf(&w, ") on %s, %s.\nMachine: %s, Linux %s, %d CPUs, %s. Every ratio compares two measurements taken minutes apart on the same machine; %d run(s) each, min / median / max.\n\n",
		time.Now().UTC().Format("2006-01-02 15:04 UTC"), "the namespace lab (tools/lab): two ext4 filesystems on loop devices, veth + bridge",
		host, strings.TrimSpace(string(kernel)), runtime.NumCPU(), runtime.Version(), runs)
	fmt.Fprintf(&w, "| figure | ratio (min / median / max) | target | met |\n|---|---|---|---|\n")
	for _, f := range figs {
		met := "yes"
		switch {
		case noTarget(f.Target):
			met = "n/a"
		case !f.Met:
			met = "**no**"
		}
		if !noTarget(f.Target) && crossesTarget(f.Target, f.Ratio) {
			// The runs fell on both sides of the target: the median's
			// verdict is within the noise.
			met += " (runs on both sides)"
		}
		fmt.Fprintf(&w, "| %s | %s | %s | %s |\n", f.Name, spread(f.Ratio), f.Target, met)
	}
	fmt.Fprintf(&w, "\n## Absolute figures (this machine, this date)\n\n")
	for _, f := range figs {
		fmt.Fprintf(&w, "- %s: baseline %s %s, measured %s %s. %s\n", f.Name, spread(f.Baseline), f.Unit, spread(f.Measured), f.Unit, f.Note)
	}
	if len(b.stages) > 0 && len(b.stages[0].order) > 0 {
		fmt.Fprintf(&w, "\n## Where a durability call's time goes\n\n")
		fmt.Fprintf(&w, "The sync runs under `duet exec`, all runs of a workload together, as the daemons timed them (`duet status --latency`; a bucket's upper bound, within 9 %%). The stages overlap: local_flush runs beside the barrier; drain, build and peer make up daemon; apply and flush are nodeB's part of peer; sync_rtt is nodeA's view of a sync request.\n")
	}
	for _, t := range b.stages {
		if len(t.order) == 0 {
			continue // a daemon that times nothing (an older build)
		}
		fmt.Fprintf(&w, "\n%s:\n\n| node | stage | calls | p50 µs | p90 µs | p99 µs |\n|---|---|---|---|---|---|\n", t.workload)
		for _, k := range t.order {
			c := t.counts[k]
			h, st, _ := strings.Cut(k, " ")
			us := func(q float64) float64 { return float64(c.Quantile(q)) / float64(time.Microsecond) }
			fmt.Fprintf(&w, "| %s | %s | %d | %.0f | %.0f | %.0f |\n", h, st, c.Total(), us(0.5), us(0.9), us(0.99))
		}
		if t.calls == 0 {
			continue
		}
		fmt.Fprintf(&w, "\nWhat each process used during these %d calls, per call (syncbench -cost: schedstat and the context switches of each process's threads, from the first timed call to the last; the daemons' own background work, heartbeats and timers, included):\n\n", t.calls)
		fmt.Fprintf(&w, "| process | CPU µs | runnable, waiting for a CPU, µs | context switches |\n|---|---|---|---|\n")
		for _, k := range t.costOrder {
			c := t.costs[k]
			n := float64(t.calls)
			fmt.Fprintf(&w, "| %s | %.0f | %.0f | %.1f |\n", k, c.CPUSeconds*1e6/n, c.WaitSeconds*1e6/n, float64(c.Switches)/n)
		}
	}
	return w.String()
}
