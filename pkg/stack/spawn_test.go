package stack

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The runtime never ends the main thread (a locked goroutine returning
// there wedges it instead): keeping it for the main goroutine puts every
// test goroutine on a thread that can exit.
func init() { runtime.LockOSThread() }

// A service outlives the thread that asked for its start. Pdeathsig is
// bound to the forking thread, and a goroutine that locks its thread and
// returns (as pkg/barrier's openAs does) ends that thread: a service
// forked there would be SIGKILLed with it.
func TestServiceOutlivesStartingThread(t *testing.T) {
	st := &Stack{Services: []Service{svc("long", "exec sleep 30")}, Log: slog.New(slog.DiscardHandler), Launch: plain, Output: &syncBuf{}}
	defer st.Stop()
	type started struct {
		tid int
		err error
	}
	res := make(chan started, 1)
	go func() {
		runtime.LockOSThread() // not unlocked: the thread exits with this goroutine
		res <- started{unix.Gettid(), st.Start(context.Background())}
	}()
	r := <-res
	if r.err != nil {
		t.Fatal(r.err)
	}
	// The kernel sends the parent-death signal as the thread exits, before
	// the thread leaves /proc.
	task := fmt.Sprintf("/proc/self/task/%d", r.tid)
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		if _, err := os.Stat(task); os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("thread %d that started the service has not exited", r.tid)
		}
	}
	st.mu.Lock()
	p := st.running[0]
	st.mu.Unlock()
	select {
	case <-p.done:
		t.Fatalf("service died when the thread that started it exited: %s", p.cmd.ProcessState)
	case <-time.After(500 * time.Millisecond):
	}
}
