package barrier

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// servers counts the goroutines answering a supervised process tree's
// notifications (serve).
func servers() int {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	return strings.Count(string(buf), "barrier.serve(")
}

// TestListenerEndsWithItsProcesses: once every process under the filter
// is gone, the goroutine that answered them ends and closes the listener.
// On this kernel (6.18) SECCOMP_IOCTL_NOTIF_RECV then returns ENOENT at
// once, forever; serve took ENOENT for a notification whose caller died
// and asked again, spinning a CPU for every service that had stopped
// (the nemesis found the daemon at 190 % after a handover killed its
// services, and the NFS server's READs, whose calls it answers, at 55 ms).
func TestListenerEndsWithItsProcesses(t *testing.T) {
	before := servers()
	var n atomic.Int32
	for i := 0; i < 3; i++ {
		if code := supervise(t, counting(&n, nil), "sh", "-c", "exit 0"); code != 0 {
			t.Fatalf("exit status %d", code)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for servers() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines still serve the listeners of processes that exited 5 s ago (%d before)", servers(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// onThreads runs each on n locked OS threads (each its own, as a service's
// threads are), with a deadline 2 s away, and returns the largest code
// they return.
func onThreads(n int, each func(i int, deadline time.Time) int) int {
	deadline := time.Now().Add(2 * time.Second)
	res := make(chan int, n)
	for i := range n {
		go func() {
			runtime.LockOSThread()
			res <- each(i, deadline)
		}()
	}
	code := 0
	for range n {
		code = max(code, <-res)
	}
	return code
}

// fsyncStorm is the supervised program of TestSignalsDoNotEndServing: 8
// threads fsync a pipe (EINVAL) for 2 s; exit ENOSYS if one got it (the
// listener was closed under a running process).
func fsyncStorm() int {
	_, w, err := os.Pipe()
	if err != nil {
		return 100
	}
	fd := int(w.Fd())
	return onThreads(8, func(_ int, deadline time.Time) int {
		for time.Now().Before(deadline) {
			if err := unix.Fsync(fd); err == unix.ENOSYS {
				return int(unix.ENOSYS)
			}
		}
		return 0
	})
}

// TestSignalsDoNotEndServing: signals to the supervisor's threads while a
// process makes durability calls (the Go runtime preempts with SIGURG)
// interrupt the listener's lock. poll then reports POLLERR, which serve
// took for the end of the processes: it closed the listener and the next
// fsync failed with ENOSYS. And a SEND interrupted the same way (EINTR)
// was lost: its caller waited for good. (A review found both.)
func TestSignalsDoNotEndServing(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("DUET_BARRIER_HELPER", "fsync-storm")
	defer signalStorm()()
	var calls atomic.Int64
	code := runSupervised(t, self, &calls)
	if code == int(unix.ENOSYS) {
		t.Fatalf("a supervised fsync failed with ENOSYS after %d calls: the listener was closed while the process ran", calls.Load())
	}
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	t.Logf("%d fsyncs answered under signals", calls.Load())
}

// signalStorm sends SIGURG (what the Go runtime preempts with) to every
// thread of this process every 50 µs until the returned function is
// called.
func signalStorm() (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		pid := unix.Getpid()
		var tids []int
		var listed time.Time
		for {
			select {
			case <-done:
				return
			default:
			}
			if time.Since(listed) > 50*time.Millisecond {
				tids = tids[:0]
				ents, _ := os.ReadDir("/proc/self/task")
				for _, e := range ents {
					if n, err := strconv.Atoi(e.Name()); err == nil {
						tids = append(tids, n)
					}
				}
				listed = time.Now()
			}
			for _, tid := range tids {
				unix.Tgkill(pid, tid, unix.SIGURG)
			}
			time.Sleep(50 * time.Microsecond)
		}
	})
	return func() {
		close(done)
		wg.Wait()
	}
}

// runSupervised runs the test binary supervised (its helper chosen by
// DUET_BARRIER_HELPER) and returns its exit status; it fails the test if
// the process still runs 20 s later (a call never answered).
func runSupervised(t *testing.T, self string, calls *atomic.Int64) int {
	t.Helper()
	cmd, err := Start(self, []string{self}, func(int32) error { calls.Add(1); return nil }, nil, func(c *exec.Cmd) { c.Stderr = os.Stderr })
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the supervised process still runs 20 s after its 2 s of calls: a call was never answered (%d answered)", calls.Load())
	}
	code, err := ExitCode(err)
	if err != nil {
		t.Fatal(err)
	}
	return code
}

// openStorm is the supervised program of TestSyncOpensGetTheirOwnFiles: 4
// threads each open their own file (dir/0..3) with O_DSYNC, again and
// again for 2 s, and check that the descriptor is that file, at SyncFDBase
// or above, and still theirs when they close it. Exit 50: another file
// (or none: open returned a descriptor the thread already had); 51: a
// number below SyncFDBase; 52: closed by someone else; 60+errno: open
// failed.
func openStorm(dir string) int {
	return onThreads(4, func(i int, deadline time.Time) int {
		path := filepath.Join(dir, strconv.Itoa(i))
		var want unix.Stat_t
		if err := unix.Stat(path, &want); err != nil {
			return 100
		}
		for time.Now().Before(deadline) {
			fd, err := unix.Open(path, unix.O_WRONLY|unix.O_DSYNC|unix.O_CLOEXEC, 0)
			if err != nil {
				return 60 + int(err.(unix.Errno))
			}
			var got unix.Stat_t
			if err := unix.Fstat(fd, &got); err != nil || got.Ino != want.Ino || got.Dev != want.Dev {
				fmt.Fprintf(os.Stderr, "thread %d: open returned descriptor %d, not its file\n", i, fd)
				return 50
			}
			if fd < SyncFDBase {
				return 51
			}
			if err := unix.Close(fd); err != nil {
				fmt.Fprintf(os.Stderr, "thread %d: closing its descriptor %d: %v\n", i, fd, err)
				return 52
			}
		}
		return 0
	})
}

// TestSyncOpensGetTheirOwnFiles: threads of a service open O_DSYNC files
// at the same time, under signals. Two found the same free number and the
// second file took the first one's place (SETFD replaces); and a signal
// while the caller took its file made open(2) return 0 (the answer was
// sent with the file, SECCOMP_ADDFD_FLAG_SEND, and the kernel withdrew the
// file but not the answer). A review found both.
func TestSyncOpensGetTheirOwnFiles(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for i := range 4 {
		if err := os.WriteFile(filepath.Join(dir, strconv.Itoa(i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("DUET_BARRIER_HELPER", "open-storm")
	t.Setenv("DUET_BARRIER_FILE", dir)
	for _, storm := range []bool{false, true} {
		stop := func() {}
		if storm {
			stop = signalStorm()
		}
		var calls atomic.Int64
		code := runSupervised(t, self, &calls)
		stop()
		if code != 0 {
			t.Fatalf("signals %v: exit %d (see openStorm)", storm, code)
		}
	}
}

// freeSyncFD looks up the top numbers one by one and reads the whole table
// only when they are taken: either way it returns the highest free one.
func TestFreeSyncFDSkipsTakenTopNumbers(t *testing.T) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	top := int(min(lim.Cur, 1<<20))
	if top-20 < SyncFDBase {
		t.Skipf("descriptor limit %d: no room above %d", top, SyncFDBase)
	}
	for _, taken := range []int{0, 3, 12} {
		for n := top - 1; n >= top-taken; n-- {
			if err := unix.Dup2(0, n); err != nil {
				t.Fatal(err)
			}
		}
		got, ok := freeSyncFD(os.Getpid())
		for n := top - 1; n >= top-taken; n-- {
			unix.Close(n)
		}
		if !ok || got != top-1-taken {
			t.Errorf("%d top numbers taken: freeSyncFD = %d, %v; want %d", taken, got, ok, top-1-taken)
		}
	}
}
