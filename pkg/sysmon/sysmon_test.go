package sysmon

import (
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestIsMonitorNap(t *testing.T) {
	for _, c := range []struct {
		s, ns int64
		want  bool
	}{
		{0, 20_000, true}, {0, 40_000, true}, {0, 640_000, true}, {0, 5_120_000, true},
		{0, 10_000_000, false}, // a retry's tenth wait may be 10 ms too
		{0, 3_000, false}, {0, 10_000, false}, {0, 1_000_000, false}, {0, 50_000, false},
		{1, 20_000, false}, {0, 0, false},
	} {
		if got := isMonitorNap(c.s, c.ns); got != c.want {
			t.Errorf("isMonitorNap(%d, %d) = %v, want %v", c.s, c.ns, got, c.want)
		}
	}
}

func TestSlackFromEnv(t *testing.T) {
	for _, c := range []struct {
		v    string
		want time.Duration
		err  bool
	}{
		{"", DefaultSlack, false}, {"0", 0, false}, {"250us", 250 * time.Microsecond, false},
		{"-1ms", 0, true}, {"2s", 0, true}, {"fast", 0, true},
	} {
		t.Setenv(EnvSlack, c.v)
		got, err := SlackFromEnv()
		if (err != nil) != c.err || (!c.err && got != c.want) {
			t.Errorf("%s=%q: %v, %v; want %v (error %v)", EnvSlack, c.v, got, err, c.want, c.err)
		}
		if err != nil && !strings.Contains(err.Error(), EnvSlack) {
			t.Errorf("%s=%q: the error %q does not name the variable", EnvSlack, c.v, err)
		}
	}
}

// switches reads thread tid's voluntary context switches: one per nap.
func switches(t *testing.T, tid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/status", tid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "voluntary_ctxt_switches:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no voluntary_ctxt_switches")
	return 0
}

// The thread Find returns is the monitor: while one goroutine spins and
// another reads /dev/zero a MiB at a time (a system call long enough for
// the monitor to take its P back every time), the monitor stays at 20 µs
// naps; with the slack set, that thread wakes several times less often.
// A thread that was not the monitor would not change. A third goroutine
// sleeps 10 ms at a time in nanosleep, a length the monitor's naps reach
// too, as a decoy that Find must not take. Nothing else arms a timer:
// another thread's timer interrupts would end the monitor's nap early,
// as the slack lets them.
func TestFindAndSlack(t *testing.T) {
	if nanosleepNR == 0 {
		t.Skipf("nanosleep's number on %s is not known here", runtime.GOARCH)
	}
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	defer zero.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	defer func() { close(stop); wg.Wait() }()
	loop := func(f func()) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				f()
			}
		}()
	}
	loop(func() {})
	buf := make([]byte, 1<<20)
	loop(func() { syscall.Read(int(zero.Fd()), buf) })
	loop(func() { syscall.Nanosleep(&syscall.Timespec{Nsec: 10_000_000}, nil) })
	tid, err := Find(5*time.Second, time.Millisecond)
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	if tid == os.Getpid() {
		t.Fatalf("Find returned the main thread %d", tid)
	}
	old, err := Slack(tid)
	if err != nil {
		t.Fatal(err)
	}
	defer SetSlack(tid, old)
	rate := func() int {
		n := switches(t, tid)
		time.Sleep(300 * time.Millisecond)
		return switches(t, tid) - n
	}
	before := rate()
	if err := SetSlack(tid, time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if got, err := Slack(tid); err != nil || got != time.Millisecond {
		t.Fatalf("slack after SetSlack: %v, %v; want 1ms", got, err)
	}
	after := rate()
	t.Logf("thread %d: %d naps in 300 ms with %v of slack, %d with 1ms", tid, before, old, after)
	if before < 100 {
		// The monitor naps hundreds of times in 300 ms while a P is
		// in a system call; another thread does not.
		t.Fatalf("thread %d napped %d times in 300 ms: not the monitor", tid, before)
	}
	if before < 600 {
		t.Skipf("the monitor napped %d times in 300 ms before the slack (about 1,800 on an idle 2-CPU machine): too busy a machine to tell", before)
	}
	if after*3 > before {
		t.Errorf("thread %d woke %d times in 300 ms with 1ms of timer slack, %d with %v: not the monitor, or the slack did not take", tid, after, before, old)
	}
}
