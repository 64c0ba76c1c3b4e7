// Package sysmon makes the Go runtime's monitor thread (sysmon) wake less
// often.
//
// sysmon runs on a thread of its own. While any of the runtime's Ps is
// busy it naps in nanosleep(2): 20 µs after it last found work (a P to
// take back from a system call, a goroutine to preempt), doubling up to
// 10 ms after 50 naps without any. duet's daemons and duet exec make
// system calls on every durability call, so sysmon stays at 20 µs: in
// the lab's 4 KiB fdatasync row it took about a tenth of each process's
// context switches and up to 29 % of the primary's CPU (docs/BENCHMARKS.md).
// Go has no setting for it (golang/go#18236).
//
// Linux rounds a thread's sleeps up by its timer slack (50 µs by default),
// set per thread in /proc/<tid>/timerslack_ns. Relax finds the monitor's
// thread and gives it a larger slack, so that each nap lasts up to the
// slack more: its duties (taking a P back from a long system call, which
// it does on the second nap that sees the call, preempting a goroutine
// that runs for 10 ms, polling the network when no P does) come up to two
// naps later. A goroutine in a long system call thus holds its P up to
// about 2 ms: long calls that many goroutines make at once go elsewhere
// (pkg/aiosync). Every other thread keeps its slack: the runtime's timers,
// the network poller and a spinning thread's 3 µs wait for work would be
// late by the slack too.
package sysmon

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// EnvSlack names the environment variable that sets the monitor's timer
// slack (a Go duration; 0 leaves it alone). Default: DefaultSlack.
const EnvSlack = "DUET_MONITOR_SLACK"

// DefaultSlack is the monitor's timer slack unless EnvSlack says
// otherwise: a nap of 20 µs lasts up to about 1 ms. Measured against 250
// µs and the kernel's 50 µs in the lab's 4 KiB fdatasync row
// (docs/BENCHMARKS.md).
const DefaultSlack = time.Millisecond

// SlackFromEnv returns the slack EnvSlack asks for, or DefaultSlack.
func SlackFromEnv() (time.Duration, error) {
	v, ok := os.LookupEnv(EnvSlack)
	if !ok || v == "" {
		return DefaultSlack, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 || d > time.Second {
		return 0, fmt.Errorf("%s=%q: want a duration from 0 to 1s (0: leave the runtime's monitor as it is)", EnvSlack, v)
	}
	return d, nil
}

// nanosleepNR is nanosleep(2)'s number on this architecture, as
// /proc/<tid>/syscall shows it.
var nanosleepNR = map[string]int{"amd64": 35, "arm64": 101}[runtime.GOARCH]

// isMonitorNap says whether a nanosleep of sec s and nsec ns is one of
// sysmon's naps: 20 µs doubled up to 5.12 ms. No other nanosleep of the
// runtime has these lengths (3, 10 and 1000 µs, and retries of whole
// milliseconds); the last doubling, 10 ms, is left out, as a retry's 10th
// wait may be 10 ms too.
func isMonitorNap(s, ns int64) bool {
	if s != 0 {
		return false
	}
	for d := int64(20_000); d <= 5_120_000; d *= 2 {
		if ns == d {
			return true
		}
	}
	return false
}

// napping reads what thread tid of this process is doing and, if it is in
// nanosleep, the sleep it asked for (read from this process's memory,
// where its argument points). ok is false for any other state.
func napping(mem *os.File, tid string) (sec, nsec int64, ok bool) {
	b, err := os.ReadFile(filepath.Join("/proc/self/task", tid, "syscall"))
	if err != nil {
		return 0, 0, false
	}
	f := strings.Fields(string(b))
	if len(f) < 2 || f[0] != strconv.Itoa(nanosleepNR) {
		return 0, 0, false
	}
	addr, err := strconv.ParseUint(strings.TrimPrefix(f[1], "0x"), 16, 63)
	if err != nil || addr == 0 {
		return 0, 0, false
	}
	var ts [16]byte
	if _, err := mem.ReadAt(ts[:], int64(addr)); err != nil {
		return 0, 0, false
	}
	return int64(binary.NativeEndian.Uint64(ts[:8])), int64(binary.NativeEndian.Uint64(ts[8:])), true
}

// Find returns the thread id of this process's runtime monitor: the
// thread seen twice napping as only sysmon does, looking every interval
// until timeout. The monitor naps only while the process works; an idle
// process's is asleep on a futex, and Find then fails.
func Find(timeout, interval time.Duration) (int, error) {
	if nanosleepNR == 0 {
		return 0, fmt.Errorf("finding the runtime's monitor: not done on %s", runtime.GOARCH)
	}
	mem, err := os.Open("/proc/self/mem")
	if err != nil {
		return 0, fmt.Errorf("finding the runtime's monitor: %w", err)
	}
	defer mem.Close()
	self := strconv.Itoa(os.Getpid()) // the main thread: never the monitor
	seen := map[string]int{}
	deadline := time.Now().Add(timeout)
	for {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return 0, fmt.Errorf("finding the runtime's monitor: %w", err)
		}
		for _, t := range tasks {
			tid := t.Name()
			if tid == self {
				continue
			}
			if s, ns, ok := napping(mem, tid); ok && isMonitorNap(s, ns) {
				if seen[tid]++; seen[tid] >= 2 {
					return strconv.Atoi(tid)
				}
			}
		}
		if time.Now().After(deadline) {
			return 0, errNotSeen
		}
		time.Sleep(interval)
	}
}

var errNotSeen = errors.New("the runtime's monitor was not seen napping")

// SetSlack sets thread tid's timer slack (0: the kernel's default for the
// process, as prctl(PR_SET_TIMERSLACK) takes 0). Another thread's needs
// CAP_SYS_NICE.
func SetSlack(tid int, slack time.Duration) error {
	p := fmt.Sprintf("/proc/%d/timerslack_ns", tid)
	if err := os.WriteFile(p, []byte(strconv.FormatInt(slack.Nanoseconds(), 10)), 0); err != nil {
		return fmt.Errorf("setting the runtime monitor's timer slack: %w", err)
	}
	return nil
}

// Slack reads thread tid's timer slack.
func Slack(tid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/timerslack_ns", tid))
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return time.Duration(n), err
}

// Relax gives the runtime's monitor slack (SlackFromEnv's), in the
// background: it looks for the monitor every 2 ms for 5 s, then for 1 s
// a minute until it finds it (the monitor naps only while the process
// works). report, if not nil, hears the outcome once: the monitor's
// thread, or why it keeps its own slack. With slack 0 nothing is done.
func Relax(slack time.Duration, report func(tid int, err error)) {
	if report == nil {
		report = func(int, error) {}
	}
	if slack <= 0 {
		return
	}
	go func() {
		window := 5 * time.Second
		for {
			tid, err := Find(window, 2*time.Millisecond)
			if errors.Is(err, errNotSeen) {
				window = time.Second
				time.Sleep(time.Minute)
				continue
			}
			if err == nil {
				err = SetSlack(tid, slack)
			}
			report(tid, err)
			return
		}
	}()
}
