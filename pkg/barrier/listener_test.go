package barrier

import (
	"os"
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

// fsyncStorm is the supervised program of TestSignalsDoNotEndServing: 8
// threads fsync a pipe (EINVAL) for 2 s; exit 38 if one got ENOSYS (the
// listener was closed under a running process).
func fsyncStorm() int {
	_, w, err := os.Pipe()
	if err != nil {
		return 100
	}
	fd := int(w.Fd())
	deadline := time.Now().Add(2 * time.Second)
	res := make(chan int, 8)
	for range 8 {
		go func() {
			runtime.LockOSThread()
			for time.Now().Before(deadline) {
				if err := unix.Fsync(fd); err == unix.ENOSYS {
					res <- int(unix.ENOSYS)
					return
				}
			}
			res <- 0
		}()
	}
	code := 0
	for range 8 {
		code = max(code, <-res)
	}
	return code
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
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		pid := unix.Getpid()
		var tids []int
		var listed time.Time
		for {
			select {
			case <-stop:
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
	defer func() {
		close(stop)
		wg.Wait()
	}()
	var calls atomic.Int64
	cmd, err := Start(self, []string{self}, func(int32) error { calls.Add(1); return nil }, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		<-done
		t.Fatalf("the supervised process still runs 30 s after its 2 s of fsyncs: a call was never answered (%d answered)", calls.Load())
	}
	code, err := ExitCode(err)
	if err != nil {
		t.Fatal(err)
	}
	if code == int(unix.ENOSYS) {
		t.Fatalf("a supervised fsync failed with ENOSYS after %d calls: the listener was closed while the process ran", calls.Load())
	}
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	t.Logf("%d fsyncs answered under signals", calls.Load())
}
