package capture

import (
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// BenchmarkBufferedWrite measures a 4 KiB pwrite over a 64 MiB file on
// each filesystem: without capture (off); with it attached and read as the
// daemon does (on: records drained, the chunk marks of what was read
// dropped every PollInterval, so writes keep emitting); and with the marks
// never dropped (marked: the hooks' cost alone once a chunk is announced).
// off/on is the capture overhead of the filesystem's hooks.
func BenchmarkBufferedWrite(b *testing.B) {
	for _, f := range filesystems {
		for _, mode := range []string{"off", "on", "marked"} {
			b.Run(f.fstype+"/"+mode, func(b *testing.B) { benchWrite(b, f.fstype, f.mib, mode, 4096) })
		}
	}
}

// BenchmarkSequentialWrite is BenchmarkBufferedWrite with 64 KiB writes in
// a row, as the bench's fio row makes them (a sequential writer: most of
// its writes fall inside the extent its earlier ones announced).
func BenchmarkSequentialWrite(b *testing.B) {
	for _, f := range filesystems {
		for _, mode := range []string{"off", "on"} {
			b.Run(f.fstype+"/"+mode, func(b *testing.B) { benchWrite(b, f.fstype, f.mib, mode, 64<<10) })
		}
	}
}

// benchStats turns on the kernel's run-time statistics of the programs
// (hook-ns/op and the per-program figures): two clock reads a run, which
// the write's own time then includes. Off, the write's time is the
// hooks' true cost.
var benchStats = flag.Bool("capture.stats", true, "report the programs' run time (BPF_STATS_RUN_TIME; adds its own cost to each run)")

// benchSkip leaves hooks unattached (a comma-separated list of parts of
// their names, e.g. "syscalls/,ctime"): what they cost is the difference.
var benchSkip = flag.String("capture.skip", "", "hooks not to attach: comma-separated parts of their names")

func benchWrite(b *testing.B, fstype string, mib int, mode string, block int) {
	if *benchSkip != "" {
		skipHook = func(name string) bool {
			for _, part := range strings.Split(*benchSkip, ",") {
				if strings.Contains(name, part) {
					return true
				}
			}
			return false
		}
		defer func() { skipHook = nil }()
	}
	fs := loopfs.Make(b, fstype, max(mib, 160))
	var c *Capture
	if mode != "off" {
		c = openOn(b, fstype, fs.Mount)
		go drainAndForget(c, mode == "on")
		// The hooks' own run time, which the write's time (noisy on
		// a shared machine) includes.
		if *benchStats {
			stats, err := ebpf.EnableStats(unix.BPF_STATS_RUN_TIME)
			if err != nil {
				b.Fatalf("enabling BPF run-time statistics: %v", err)
			}
			defer stats.Close()
		}
	}
	f, err := os.Create(filepath.Join(fs.Mount, "f"))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	const size = 64 << 20
	if err := f.Truncate(size); err != nil {
		b.Fatal(err)
	}
	page := make([]byte, block)
	b.SetBytes(int64(len(page)))
	b.ResetTimer()
	before := hookTimes(b, c)
	for i := 0; i < b.N; i++ {
		if _, err := f.WriteAt(page, int64(i*len(page))%size); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if c != nil && *benchStats {
		after := hookTimes(b, c)
		var total time.Duration
		for name, t := range after {
			if strings.HasSuffix(name, runsSuffix) {
				// Runs per write of the programs that ran.
				if d := t - before[name]; d > 0 {
					b.ReportMetric(float64(d)/float64(b.N), name)
				}
				delete(after, name)
				continue
			}
			total += t - before[name]
		}
		b.ReportMetric(float64(total)/float64(b.N), "hook-ns/op")
		// Where it goes: the programs that cost over 5 % of it.
		for name, t := range after {
			if d := t - before[name]; d*20 > total {
				b.ReportMetric(float64(d)/float64(b.N), name+"-ns/op")
			}
		}
		n, _ := c.Counters()
		b.ReportMetric(float64(n.Seq)/float64(b.N), "records/op")
	}
}

// hookTimes is the run time of each program of c so far, by name, and
// (name + runsSuffix) how many times it ran.
func hookTimes(b *testing.B, c *Capture) map[string]time.Duration {
	times := map[string]time.Duration{}
	if c == nil {
		return times
	}
	v := reflect.ValueOf(c.objs.CapturePrograms)
	for i := range v.NumField() {
		p, ok := v.Field(i).Interface().(*ebpf.Program)
		if !ok || p == nil {
			continue
		}
		st, err := p.Stats()
		if err != nil {
			b.Fatalf("program stats: %v", err)
		}
		name := v.Type().Field(i).Tag.Get("ebpf")
		times[name] = st.Runtime
		times[name+runsSuffix] = time.Duration(st.RunCount)
	}
	return times
}

const runsSuffix = "-runs/op"

// drainAndForget reads records until c closes and, if forget, drops the
// marks of what it read every PollInterval, as the daemon's batches do.
func drainAndForget(c *Capture, forget bool) {
	recs := make(chan Record, 1<<12)
	go func() {
		defer close(recs)
		for {
			var r Record
			if c.Read(&r) != nil {
				return
			}
			recs <- r
		}
	}()
	var keys []CaptureChunkKey
	tick := time.NewTicker(PollInterval)
	defer tick.Stop()
	for {
		select {
		case r, ok := <-recs:
			if !ok {
				return
			}
			if !forget {
				continue
			}
			switch r.Kind {
			case KindAttr:
				c.ForgetAttr(InodeKey{Dev: r.Dev, Ino: r.Ino})
			case KindData, KindMmap:
				for ch := r.Pos >> ChunkShift; ch <= (r.Pos+r.Len-1)>>ChunkShift && ch < 1<<12; ch++ {
					keys = append(keys, CaptureChunkKey{Dev: r.Dev, Ino: r.Ino, Chunk: ch})
				}
			}
		case <-tick.C:
			if len(keys) > 0 {
				c.ForgetChunks(keys)
				keys = keys[:0]
			}
		}
	}
}

// BenchmarkCounters compares a read of the counters, which every
// durability call makes (twice on the primary), through the mapping
// (Counters) with the three bpf() lookups it replaced (lookup).
func BenchmarkCounters(b *testing.B) {
	loopfs.RequireRoot(b)
	c, err := Open(Options{}) // attached: syscalls take the tracepoints' path
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	b.Run("mapped", func(b *testing.B) {
		for b.Loop() {
			if _, err := c.Counters(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("lookup", func(b *testing.B) {
		for b.Loop() {
			if _, err := c.lookupCounters(); err != nil {
				b.Fatal(err)
			}
		}
	})
}
