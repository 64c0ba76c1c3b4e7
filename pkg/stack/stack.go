// Package stack runs the services of the primary (the "module"): started
// in order once the VIP is up, watched by their checks, restarted locally
// a few times, stopped in reverse order when the node leaves the role.
package stack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Service is one managed service.
type Service struct {
	Name string
	// Start runs in the foreground for the service's lifetime (sh -c).
	Start string
	// Stop, if set, runs before the process group gets SIGTERM.
	Stop string
	// CheckTCP is a host:port that must accept connections; CheckCommand
	// a command that must exit 0. With neither, the process must live.
	CheckTCP     string
	CheckCommand string
	// CheckNFS is a host:port whose NFS NULL procedure (version 4, or 3)
	// must answer.
	CheckNFS     string
	Interval     time.Duration
	StartTimeout time.Duration
	StopTimeout  time.Duration
	// Restarts is how many local restarts a failing service gets before
	// the node gives up the role.
	Restarts int
}

// settle is how long a service without a check must stay up to count as
// started.
const settle = 200 * time.Millisecond

// Launch starts "sh -c script" for a service, e.g. under the barrier's
// supervision; setup is applied to the command before it starts. It may
// also return an end for the command: a call that makes it kill every
// process under it, also one that left its process group, and exit, and
// that frees what this needs once the command is gone. The stack calls it
// to kill the service and once the command is reaped. Without one (nil),
// a kill is SIGKILL to the process group, which misses what left it.
type Launch func(args []string, setup func(*exec.Cmd)) (cmd *exec.Cmd, end func(), err error)

// endGrace bounds how long a command may take to end on its end's request
// before its process group gets SIGKILL.
const endGrace = 5 * time.Second

// Status is one service's state.
type Status struct {
	Name     string `json:"name"`
	Running  bool   `json:"running"`
	Healthy  bool   `json:"healthy"`
	Pid      int    `json:"pid,omitempty"`
	Restarts int    `json:"restarts"`
	Error    string `json:"error,omitempty"`
}

// Stack runs services.
type Stack struct {
	Services []Service
	Log      *slog.Logger
	Launch   Launch
	Output   io.Writer // services' stdout and stderr
	// Failed is called (once per Start) when a service failed beyond its
	// restarts.
	Failed func(service, why string)

	mu      sync.Mutex
	running []*proc
	// stopping: what Stop is stopping (Kill reaches those too).
	stopping []*proc
	// launching: the services being started, not yet running (Kill
	// reaches those too): Start's, and watchers' restarts.
	launching map[*proc]bool
	// killed: Kill ran; no service starts again until the next Start (a
	// watcher restarting one would bring it back after the kill).
	killed bool
	cancel context.CancelFunc
	wg     sync.WaitGroup
	// startFailed is the service whose start failed last and why, shown
	// by Status until the next Start: Start's Stop drops every service,
	// and `duet status` showed none and no error (a review).
	startFailed *Status
}

type proc struct {
	svc  Service
	cmd  *exec.Cmd
	done chan struct{}
	// end is Launch's end (once), or nil.
	end      func()
	healthy  bool
	restarts int
	err      string
	// passed counts the checks passed in a row since the last failure:
	// after restartForgiven of them the restarts count from 0 again.
	passed int
}

// restartForgiven is how many checks in a row a service passes before its
// restarts count from 0 again: restarts bound a burst of failures, not
// every failure of the term (with restarts: 1, two crashes weeks apart
// failed the node over; a review).
const restartForgiven = 20

// Start starts every service in order, each once its predecessor passed
// its check. On failure it stops what it started and returns the error.
func (s *Stack) Start(ctx context.Context) error {
	s.Stop()
	for _, svc := range s.Services {
		// time.NewTicker panics on a non-positive interval: the daemon
		// died once it served (config refuses them too).
		for _, d := range []struct {
			what string
			v    time.Duration
		}{{"check interval", svc.Interval}, {"start timeout", svc.StartTimeout}, {"stop timeout", svc.StopTimeout}} {
			if d.v <= 0 {
				return fmt.Errorf("service %s: %s %s: must be positive", svc.Name, d.what, d.v)
			}
		}
	}
	mctx, cancel := context.WithCancel(context.Background())
	s.mu.Lock()
	s.cancel = cancel
	s.killed = false
	s.startFailed = nil
	s.mu.Unlock()
	for _, svc := range s.Services {
		p := &proc{svc: svc}
		// An ended start launches nothing more: the node may have left
		// the role (node.endServiceStart).
		err := ctx.Err()
		if err == nil {
			err = s.launch(ctx, p)
		}
		if err == nil {
			// Launched: from launching to running under one lock, so
			// that a Kill sees it in one or the other.
			cerr := ctx.Err()
			s.mu.Lock()
			delete(s.launching, p)
			switch {
			case s.killed:
				err = errKilled // Kill reached it as a launching one
			case cerr != nil:
				err = cerr
			default:
				s.running = append(s.running, p)
			}
			s.mu.Unlock()
			if err != nil {
				s.kill(p)
			}
		}
		if err != nil {
			s.Stop()
			s.mu.Lock()
			s.startFailed = &Status{Name: svc.Name, Error: "start failed: " + err.Error()}
			s.mu.Unlock()
			return fmt.Errorf("service %s: %w", svc.Name, err)
		}
	}
	var once sync.Once
	for _, p := range s.running {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.watch(mctx, p, &once)
		}()
	}
	return nil
}

// launch starts p and waits until its check passes.
func (s *Stack) launch(ctx context.Context, p *proc) error {
	s.mu.Lock()
	killed := s.killed
	s.mu.Unlock()
	if killed {
		return errKilled
	}
	cmd, end, err := spawn(s.Launch, []string{"/bin/sh", "-c", p.svc.Start}, func(c *exec.Cmd) {
		c.Stdout, c.Stderr = s.Output, s.Output
		// Its own process group, so stop reaches its children; killed
		// with the daemon, so no service outlives a crashed duet (spawn
		// forks on a thread that lives as long as the daemon).
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	})
	if err != nil {
		return err
	}
	if end != nil {
		end = sync.OnceFunc(end)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		if end != nil {
			end() // frees it
		}
		close(done)
	}()
	s.mu.Lock()
	p.cmd, p.done, p.end = cmd, done, end
	killed = s.killed
	if s.launching == nil {
		s.launching = map[*proc]bool{}
	}
	s.launching[p] = true
	s.mu.Unlock()
	// Launched, it stays among the launching ones until its caller has
	// it among the running ones (Start, watch).
	launched := false
	defer func() {
		if !launched {
			s.mu.Lock()
			delete(s.launching, p)
			s.mu.Unlock()
		}
	}()
	if killed {
		// Kill ran while it was forked: Kill did not see it.
		s.kill(p)
		return errKilled
	}
	s.Log.Info("service started", "service", p.svc.Name, "pid", cmd.Process.Pid)
	if p.svc.CheckTCP == "" && p.svc.CheckCommand == "" && p.svc.CheckNFS == "" {
		// Only the process to watch: it must at least survive its start.
		select {
		case <-done:
		case <-ctx.Done():
		case <-time.After(settle):
		}
	}
	deadline := time.Now().Add(p.svc.StartTimeout)
	for {
		err := s.check(ctx, p)
		if err == nil {
			s.mu.Lock()
			p.healthy, p.err = true, ""
			s.mu.Unlock()
			launched = true
			return nil
		}
		if time.Now().After(deadline) {
			s.kill(p)
			return fmt.Errorf("not healthy %s after start: %w", p.svc.StartTimeout, err)
		}
		select {
		case <-done:
			if cmd.ProcessState.ExitCode() == 0 {
				// systemctl start, a trailing &, a server that forks.
				return fmt.Errorf("exited during start (%s): its start command must keep the service in the foreground (no `systemctl start`, no `&`, no daemonizing fork)", cmd.ProcessState)
			}
			return fmt.Errorf("exited during start: %s", cmd.ProcessState)
		case <-ctx.Done():
			s.kill(p)
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		s.mu.Lock()
		killed = s.killed
		s.mu.Unlock()
		if killed {
			s.kill(p) // Kill reached it too; it may not come back
			return errKilled
		}
	}
}

func (s *Stack) check(ctx context.Context, p *proc) error {
	select {
	case <-p.done:
		return fmt.Errorf("process exited (%s)", p.cmd.ProcessState)
	default:
	}
	switch {
	case p.svc.CheckTCP != "":
		c, err := net.DialTimeout("tcp", p.svc.CheckTCP, time.Second)
		if err != nil {
			return fmt.Errorf("tcp check %s: %w", p.svc.CheckTCP, err)
		}
		c.Close()
	case p.svc.CheckNFS != "":
		if err := NFSNull(p.svc.CheckNFS, 2*time.Second); err != nil {
			return fmt.Errorf("nfs check %s: %w", p.svc.CheckNFS, err)
		}
	case p.svc.CheckCommand != "":
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if out, err := Shell(cctx, p.svc.CheckCommand).CombinedOutput(); err != nil {
			return fmt.Errorf("check command: %v: %s", err, trim(out))
		}
	}
	return nil
}

func trim(b []byte) string {
	if len(b) > 200 {
		b = b[:200]
	}
	return string(b)
}

// watch checks p every interval; a failure restarts it, and past its
// restarts the stack reports it failed.
func (s *Stack) watch(ctx context.Context, p *proc, once *sync.Once) {
	t := time.NewTicker(p.svc.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.done:
		case <-t.C:
		}
		if ctx.Err() != nil {
			return
		}
		err := s.check(ctx, p)
		if err == nil {
			s.mu.Lock()
			if p.passed++; p.passed == restartForgiven && p.restarts > 0 {
				s.Log.Info("service healthy again: its restarts count from 0", "service", p.svc.Name, "restarts", p.restarts)
				p.restarts = 0
			}
			s.mu.Unlock()
			continue
		}
		s.mu.Lock()
		p.healthy, p.err = false, err.Error()
		p.passed = 0
		n := p.restarts
		s.mu.Unlock()
		if n >= p.svc.Restarts {
			s.Log.Error("service failed, no restarts left", "service", p.svc.Name, "err", err, "restarts", n)
			if s.Failed != nil {
				once.Do(func() { go s.Failed(p.svc.Name, err.Error()) })
			}
			return
		}
		s.Log.Warn("service check failed, restarting it", "service", p.svc.Name, "err", err, "restart", n+1, "of", p.svc.Restarts)
		s.stopOne(p)
		s.mu.Lock()
		p.restarts++
		s.mu.Unlock()
		if err := s.launch(ctx, p); err != nil {
			s.mu.Lock()
			p.err = err.Error()
			s.mu.Unlock()
			s.Log.Warn("service restart failed", "service", p.svc.Name, "err", err)
		} else {
			s.mu.Lock()
			delete(s.launching, p) // it is among the running ones
			s.mu.Unlock()
		}
	}
}

// Stop stops every service, last started first.
func (s *Stack) Stop() {
	s.mu.Lock()
	if s.cancel != nil {
		s.cancel()
		s.cancel = nil
	}
	s.mu.Unlock()
	s.wg.Wait()
	s.mu.Lock()
	running := s.running
	s.running = nil
	s.stopping = running
	s.mu.Unlock()
	for i := len(running) - 1; i >= 0; i-- {
		s.stopOne(running[i])
	}
	s.mu.Lock()
	s.stopping = nil
	s.mu.Unlock()
}

// Kill ends every service at once, every process under it (its end, or
// SIGKILL to its process group), those Stop is stopping too, and returns
// when they are gone. A killed process never sees its pending calls
// return: the node uses it when durability calls the services wait on can
// no longer be confirmed, rather than fail them (a database that gets EIO
// from a log flush may still report the commit).
func (s *Stack) Kill() {
	s.mu.Lock()
	s.killed = true
	all := append(append([]*proc(nil), s.running...), s.stopping...)
	for p := range s.launching {
		all = append(all, p)
	}
	var procs []proc
	for _, p := range all {
		if p.cmd != nil {
			// A copy: a restart replaces cmd, done and end, under mu.
			procs = append(procs, *p)
		}
	}
	s.mu.Unlock()
	for i := range procs {
		s.killNow(&procs[i])
	}
	// One grace for all: each service's own, one after the other, made
	// Kill take endGrace per stuck service (from a review).
	deadline := time.Now().Add(endGrace)
	for i := range procs {
		s.waitKilled(&procs[i], deadline)
	}
}

// errKilled: a service was not started because Kill ran.
var errKilled = errors.New("not started: the services were killed")

// stopOne runs the stop command, then SIGTERM, then SIGKILL, to the
// service's process group.
func (s *Stack) stopOne(p *proc) {
	if p.cmd == nil {
		return
	}
	select {
	case <-p.done:
		return
	default:
	}
	if p.svc.Stop != "" {
		ctx, cancel := context.WithTimeout(context.Background(), p.svc.StopTimeout)
		out, err := Shell(ctx, p.svc.Stop).CombinedOutput()
		cancel()
		if err != nil {
			s.Log.Warn("service stop command failed", "service", p.svc.Name, "err", err, "output", trim(out))
		}
	}
	pgid := p.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(p.svc.StopTimeout):
		s.Log.Warn("service did not stop in time: killing it", "service", p.svc.Name, "timeout", p.svc.StopTimeout)
		s.kill(p)
	}
	s.Log.Info("service stopped", "service", p.svc.Name)
}

// kill kills p's command and everything under it, and returns once the
// command is reaped.
func (s *Stack) kill(p *proc) {
	s.killNow(p)
	s.waitKilled(p, time.Now().Add(endGrace))
}

// killNow asks p's end to kill it, or SIGKILLs its process group.
func (s *Stack) killNow(p *proc) {
	select {
	case <-p.done:
		// Gone and reaped: its process group id may be another's now.
	default:
		if p.end != nil {
			p.end()
		} else {
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		}
	}
}

// waitKilled waits for p's command after killNow; one that has not ended
// on its end's request by deadline (its leader stopped or stuck) gets
// SIGKILL to its process group.
func (s *Stack) waitKilled(p *proc, deadline time.Time) {
	if p.end != nil {
		select {
		case <-p.done:
			return
		case <-time.After(time.Until(deadline)):
			s.Log.Warn("service did not end on its kill request: killing its process group", "service", p.svc.Name, "after", endGrace)
			select {
			case <-p.done:
				return
			default:
				syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			}
		}
	}
	<-p.done
}

// Status reports every running service.
func (s *Stack) Status() []Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Status
	for _, p := range s.running {
		st := Status{Name: p.svc.Name, Healthy: p.healthy, Restarts: p.restarts, Error: p.err}
		if p.cmd != nil {
			select {
			case <-p.done:
			default:
				st.Running, st.Pid = true, p.cmd.Process.Pid
			}
		}
		out = append(out, st)
	}
	if s.startFailed != nil && len(out) == 0 {
		out = append(out, *s.startFailed)
	}
	return out
}
