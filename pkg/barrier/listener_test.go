package barrier

import (
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"
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
