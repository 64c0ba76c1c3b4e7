package replica

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/fstree"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// The scale benchmarks build a tree of small files (issue 18): by default
// 100,000 files of 100 bytes in 100 directories, the lab's figure. Put
// TMPDIR on a tmpfs to measure duet rather than the disk.
var (
	scaleFiles = flag.Int("scale.files", 100000, "files in the scale benchmarks' tree")
	scaleDirs  = flag.Int("scale.dirs", 100, "directories they are spread over")
	scaleSize  = flag.Int("scale.size", 100, "bytes per file")
	// The secondary's CPU profile (it runs in a process of its own).
	scaleSecondaryProfile = flag.String("scale.secondary-cpuprofile", "", "write the secondary's CPU profile here")
)

// makeScaleTree writes files files of size bytes spread over dirs
// directories under dir.
func makeScaleTree(tb testing.TB, dir string, files, dirs, size int) {
	tb.Helper()
	data := make([]byte, size)
	for i := range data {
		data[i] = byte('a' + i%26)
	}
	for d := range dirs {
		sub := filepath.Join(dir, fmt.Sprintf("d%04d", d))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			tb.Fatal(err)
		}
		for i := d; i < files; i += dirs {
			// Each file its own bytes, so that no two sum alike.
			copy(data, fmt.Sprintf("%08d", i))
			if err := os.WriteFile(filepath.Join(sub, fmt.Sprintf("f%07d", i)), data, 0o644); err != nil {
				tb.Fatal(err)
			}
		}
	}
}

// scaleRoot is the root of a scale tree of the flags' size, made for b.
func scaleRoot(b *testing.B) *os.File {
	b.Helper()
	src := filepath.Join(b.TempDir(), "src")
	makeScaleTree(b, src, *scaleFiles, *scaleDirs, *scaleSize)
	root, err := fstree.OpenRoot(src)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { root.Close() })
	return root
}

// cpuTime is the CPU time this process used so far (user and system):
// a figure that other load on the machine disturbs less than the time.
// The secondary's process is not counted.
func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// liveHeap is the heap in use after full collections, once it no longer
// shrinks: the cleanups a collection queues (a dropped shadow's, which
// lets go of its regions) run after it, and what they let go of is freed
// by the next one.
func liveHeap() uint64 {
	var last uint64
	for i := 0; i < 20; i++ {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		if i > 0 && ms.HeapAlloc >= last {
			return ms.HeapAlloc
		}
		last = ms.HeapAlloc
		time.Sleep(time.Millisecond) // the cleanups' goroutine
	}
	return last
}

// heapPeak samples the heap in use until stop is called, and returns the
// highest sample, and the highest live heap (what the latest collection
// found reachable): the heap in use peaks wherever the collector's goal,
// twice the live heap, lets it, which moves from run to run; the live heap
// is what a change of the data held shows in.
func heapPeak() (stop func() (peak, live uint64)) {
	done := make(chan struct{})
	var peak, live uint64
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		s := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			peak = max(peak, ms.HeapAlloc)
			metrics.Read(s)
			live = max(live, s[0].Value.Uint64())
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() (uint64, uint64) {
		close(done)
		wg.Wait()
		return peak, live
	}
}

// TestScaleSecondaryProcess is the secondary of the scale benchmarks, in
// a process of its own so that the primary's memory is measured alone: it
// serves directory "data" under $DUET_SCALE_SECONDARY, prints its address
// and runs until its standard input closes.
func TestScaleSecondaryProcess(t *testing.T) {
	top := os.Getenv("DUET_SCALE_SECONDARY")
	if top == "" {
		t.Skip("the scale benchmarks' secondary: runs only as their child process")
	}
	sec := newTestSecondaryLink(t, filepath.Join(top, "state"), testLink, slog.New(slog.NewTextHandler(io.Discard, nil)))
	fmt.Printf("addr %s\n", sec.addr)
	io.Copy(io.Discard, os.Stdin)
}

// spawnSecondary starts TestScaleSecondaryProcess serving top/data and
// returns its address, and stop, which ends it and returns the CPU time it
// used and its peak resident set (called at the benchmark's end if not
// before).
func spawnSecondary(tb testing.TB, top string) (addr string, stop func() (cpu time.Duration, peak uint64)) {
	tb.Helper()
	args := []string{"-test.run=^TestScaleSecondaryProcess$"}
	if *scaleSecondaryProfile != "" {
		args = append(args, "-test.cpuprofile="+*scaleSecondaryProfile)
	}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "DUET_SCALE_SECONDARY="+top)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		tb.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		tb.Fatal(err)
	}
	var once sync.Once
	var peak uint64
	stop = func() (time.Duration, uint64) {
		once.Do(func() {
			peak = procStatus(tb, strconv.Itoa(cmd.Process.Pid), "VmHWM")
			stdin.Close()
			cmd.Wait()
		})
		return cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime(), peak
	}
	tb.Cleanup(func() { stop() })
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if addr, ok := strings.CutPrefix(sc.Text(), "addr "); ok {
			go io.Copy(io.Discard, stdout)
			return addr, stop
		}
	}
	tb.Fatalf("the secondary process printed no address: %v", sc.Err())
	return "", nil
}

// procStatus returns a field of /proc/<pid>/status in bytes (VmRSS: the
// resident set; VmHWM: its peak).
func procStatus(tb testing.TB, pid, field string) uint64 {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				tb.Fatal(err)
			}
			return kb << 10
		}
	}
	tb.Fatalf("no %s in /proc/%s/status", field, pid)
	return 0
}

// syncRun is what initialSync measured.
type syncRun struct {
	took         time.Duration // until the peer had it all
	heapPeak     uint64        // this process's heap, at its highest
	livePeak     uint64        // its live heap, at its highest
	secondaryCPU time.Duration
	secondaryRSS uint64 // its peak
}

// initialSync runs a Primary of src against a secondary process serving
// top/data until the first full sync is complete, and returns the Primary
// (stopped, its state kept; the caller closes it) and the run's figures.
func initialSync(tb testing.TB, top, src string) (*Primary, syncRun) {
	tb.Helper()
	addr, stopSecondary := spawnSecondary(tb, top)
	p, err := NewPrimary(Dir{Name: "data", Path: src}, addr, testLink, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		tb.Fatal(err)
	}
	stopPeak := heapPeak()
	start := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, nil) }()
	for deadline := time.Now().Add(30 * time.Minute); ; time.Sleep(5 * time.Millisecond) {
		st := p.Status()
		if st.InSync && st.FullSyncs > 0 && !st.Resync.Active {
			break
		}
		if time.Now().After(deadline) {
			tb.Fatalf("the initial sync did not end: %+v", st)
		}
	}
	took := time.Since(start)
	cancel()
	wg.Wait()
	run := syncRun{took: took}
	run.heapPeak, run.livePeak = stopPeak()
	run.secondaryCPU, run.secondaryRSS = stopSecondary()
	return p, run
}

// TestInitialSyncHeapFlat: an initial sync to an empty peer sends the tree
// as it reads it, so the primary's live heap at its highest does not grow
// with the files (a listing of the tree, held whole to compare it with the
// peer's, cost about 100 bytes a file: 100 MiB of heap at 1M files, and
// twice that with the collector's headroom).
func TestInitialSyncHeapFlat(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's bookkeeping makes the heap's figures meaningless: this runs in the plain pass of make test")
	}
	// The shadow's regions outside the heap from their first byte: its
	// records' and tables' own growth is no listing.
	// And small batches, few in flight: a batch filling up to its bound
	// is no listing either.
	defer func(a, r, u int) { mapAt, batchRaw, maxUnacked = a, r, u }(mapAt, batchRaw, maxUnacked)
	mapAt, batchRaw, maxUnacked = 0, 256<<10, 1<<20
	// Empty files on tmpfs, where there is one: the entries are what
	// counts, and a disk's flushes made the test a minute long.
	tmp := t.TempDir()
	if shm, err := os.MkdirTemp("/dev/shm", "duet-heapflat-"); err == nil {
		tmp = shm
		defer os.RemoveAll(tmp)
	}
	run := 0
	peak := func(files int) uint64 {
		run++
		top := filepath.Join(tmp, strconv.Itoa(run))
		defer os.RemoveAll(top)
		src := filepath.Join(top, "src")
		makeScaleTree(t, src, files, 50, 0)
		debug.FreeOSMemory()
		base := liveHeap()
		p, run := initialSync(t, filepath.Join(top, "peer"), src)
		p.Close()
		if run.livePeak < base {
			return 0
		}
		return run.livePeak - base
	}
	// A first sync allocates what stays for the next (the compressor's
	// tables, the test's own): not counted.
	peak(1000)
	// The listing cost about 140 bytes a file here; what else is live
	// during a sync varies by about 1 MiB from one to the next.
	const small, big, most = 20000, 80000, 50
	a, b := peak(small), peak(big)
	per := (float64(b) - float64(a)) / (big - small)
	t.Logf("live heap peak: %d KiB at %d files, %d KiB at %d: %.1f B a file more", a>>10, small, b>>10, big, per)
	if per > most {
		t.Fatalf("the live heap grows by %.1f bytes a file during an initial sync (%d KiB at %d files, %d KiB at %d): want at most %d",
			per, a>>10, small, b>>10, big, most)
	}
}

// BenchmarkInitialSync measures the first full sync of a tree of small
// files from a Primary to an empty secondary (another process) over the
// loopback, and the primary's memory: the heap the Primary still holds
// after the sync, per file, with the shadow's memory mapped outside the
// heap (retained-B/file; mapped-B/file that memory alone), the heap's peak during it
// (peak-B/file) and the live heap's (live-peak-B/file), and the process's
// resident set at its peak during the sync and right after it
// (rss-peak-MiB, rss-after-MiB: what the lab measures of the daemon). Run
// with -benchtime=1x.
func BenchmarkInitialSync(b *testing.B) { benchFullSync(b, false) }

// BenchmarkFullResync is BenchmarkInitialSync against a peer that holds
// the same files already (a copy of unknown lineage: every file is
// compared by checksums, none is sent).
func BenchmarkFullResync(b *testing.B) { benchFullSync(b, true) }

func benchFullSync(b *testing.B, peerHasIt bool) {
	files := *scaleFiles
	for range b.N {
		b.StopTimer()
		top := b.TempDir()
		src := filepath.Join(top, "src")
		makeScaleTree(b, src, files, *scaleDirs, *scaleSize)
		if peerHasIt {
			makeScaleTree(b, filepath.Join(top, "peer", "data"), files, *scaleDirs, *scaleSize)
		}
		debug.FreeOSMemory()
		base := liveHeap()
		// Writing 5 to clear_refs resets VmHWM to the current RSS.
		os.WriteFile("/proc/self/clear_refs", []byte("5"), 0)
		cpu0 := cpuTime()
		b.StartTimer()
		p, run := initialSync(b, filepath.Join(top, "peer"), src)
		took, peak := run.took, run.heapPeak
		b.StopTimer()
		cpu := cpuTime() - cpu0
		rssPeak, rssAfter := procStatus(b, "self", "VmHWM"), procStatus(b, "self", "VmRSS")
		held := liveHeap()
		mapped := 0
		if p.sh != nil {
			mapped = p.sh.mappedBytes()
			// Freed here, not by the cleanup after a collection: its
			// heap part would still count in after.
			p.sh.mem.free()
		}
		runtime.KeepAlive(p)
		p.Close()
		p = nil
		after := liveHeap()
		b.ReportMetric(took.Seconds(), "sync-s")
		b.ReportMetric(cpu.Seconds(), "primary-cpu-s")
		b.ReportMetric(run.secondaryCPU.Seconds(), "secondary-cpu-s")
		b.ReportMetric(float64(run.secondaryRSS>>20), "secondary-rss-peak-MiB")
		b.ReportMetric((float64(held)-float64(after)+float64(mapped))/float64(files), "retained-B/file")
		b.ReportMetric(float64(mapped)/float64(files), "mapped-B/file")
		b.ReportMetric(float64(peak-base)/float64(files), "peak-B/file")
		b.ReportMetric((float64(run.livePeak)-float64(base))/float64(files), "live-peak-B/file")
		b.ReportMetric(float64(rssPeak>>20), "rss-peak-MiB")
		b.ReportMetric(float64(rssAfter>>20), "rss-after-MiB")
		b.Logf("%d files: full sync %s, primary retains %.0f B/file (%d MiB), heap peak %d MiB (live %d MiB) over %d MiB before, RSS peak %d MiB, after %d MiB",
			files, took.Round(time.Millisecond), float64(held-after)/float64(files), (held-after)>>20, (peak-base)>>20, (max(run.livePeak, base)-base)>>20, base>>20, rssPeak>>20, rssAfter>>20)
		b.StartTimer()
	}
}

// BenchmarkScan measures fstree.Scan of the scale tree, with checksums
// (a full comparison) and without, and the primary's scan, which reads
// each inode's generation too (gens).
func BenchmarkScan(b *testing.B) {
	root := scaleRoot(b)
	for _, v := range []struct {
		name       string
		sums, gens bool
	}{{"sums=false", false, false}, {"sums=true", true, false}, {"gens", false, true}} {
		b.Run(v.name, func(b *testing.B) {
			for range b.N {
				base := liveHeap()
				es, _, err := scanWith(root, v.sums, v.gens)
				if err != nil {
					b.Fatal(err)
				}
				held := liveHeap()
				b.ReportMetric(float64(held-base)/float64(len(es)), "B/entry")
				runtime.KeepAlive(es)
			}
		})
	}
}

// BenchmarkShadow measures the shadow of the scale tree: built from a scan
// as a full sync builds it, and the heap it holds per entry.
func BenchmarkShadow(b *testing.B) {
	root := scaleRoot(b)
	es, _, err := fstree.Scan(root, false)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for range b.N {
		base := liveHeap()
		sh := newShadow(es)
		held := liveHeap()
		b.ReportMetric(float64(held-base)/float64(len(es)), "B/entry")
		runtime.KeepAlive(sh)
	}
}

// scanWith lists the tree under root as fstree.Scan does, with each
// inode's generation if gens (fstree.WalkGens).
func scanWith(root *os.File, sums, gens bool) ([]wire.Entry, int, error) {
	walk := fstree.Walk
	if gens {
		walk = fstree.WalkGens
	}
	return fstree.Collect(func(fn func(*wire.Entry) error) (int, error) { return walk(root, sums, fn) })
}
