package stack

import (
	"os/exec"
	"runtime"
	"sync"
)

// The kernel binds Pdeathsig to the thread that forked the child, not to
// the process: the child is signalled when that thread exits. Go forks on
// whatever thread the calling goroutine runs on, and threads do exit: a
// goroutine that locks its thread and returns without unlocking ends it,
// which pkg/barrier does on purpose. A service forked on such a thread was
// SIGKILLed at random. Services are therefore forked on one thread that
// lives as long as the daemon.

// spawnReq is one start for the spawner thread.
type spawnReq struct {
	launch Launch
	args   []string
	setup  func(*exec.Cmd)
	done   chan spawnResult
}

type spawnResult struct {
	cmd *exec.Cmd
	end func()
	err error
}

var (
	spawnOnce sync.Once
	spawnReqs chan spawnReq
)

// spawn runs launch on the spawner thread: the children it forks there
// get their parent-death signal only when the daemon dies.
func spawn(launch Launch, args []string, setup func(*exec.Cmd)) (*exec.Cmd, func(), error) {
	spawnOnce.Do(func() {
		spawnReqs = make(chan spawnReq)
		go spawner(spawnReqs)
	})
	done := make(chan spawnResult, 1)
	spawnReqs <- spawnReq{launch, args, setup, done}
	r := <-done
	return r.cmd, r.end, r.err
}

// spawner never returns and never unlocks its thread, so the thread is
// never ended nor lent to another goroutine (which might change its
// credentials or namespaces before a fork).
func spawner(reqs <-chan spawnReq) {
	runtime.LockOSThread()
	for r := range reqs {
		cmd, end, err := r.launch(r.args, r.setup)
		r.done <- spawnResult{cmd, end, err}
	}
}
