package barrier

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// startGroup starts script under runGroup as the daemon does.
func startGroup(t *testing.T, script string) *exec.Cmd {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd, err := Start(self, []string{"/bin/sh", "-c", script}, func(int32) error { return nil }, nil, func(c *exec.Cmd) {
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		c.Env = append(os.Environ(), GroupEnv+"="+strconv.Itoa(os.Getpid()))
		c.Stdout, c.Stderr = os.Stderr, os.Stderr
	})
	if err != nil {
		t.Fatal(err)
	}
	pgid := cmd.Process.Pid
	t.Cleanup(func() { unix.Kill(-pgid, unix.SIGKILL); cmd.Wait() })
	return cmd
}

// zombiesOf counts the zombie children of pid.
func zombiesOf(pid int) int {
	n := 0
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+2:])
		if len(f) > 1 && f[0] == "Z" && f[1] == strconv.Itoa(pid) {
			n++
		}
	}
	return n
}

// TestGroupLeaderReapsOrphansWhileCommandRuns: as a subreaper the leader
// adopts every orphan of the service (a helper whose parent exited, a
// double fork), but it waited only for its command until that exited:
// each adopted process that exited meanwhile stayed a zombie for the
// service's whole life (before, init reaped them). A long-running service
// that spawns such helpers filled the pid space. From a review of
// 4718526 (failed on it).
func TestGroupLeaderReapsOrphansWhileCommandRuns(t *testing.T) {
	cmd := startGroup(t, "for i in 1 2 3 4 5 6 7 8 9 10; do (sleep 0.01 &); done; sleep 30")
	time.Sleep(1500 * time.Millisecond)
	if z := zombiesOf(cmd.Process.Pid); z > 0 {
		t.Fatalf("%d orphans adopted by the group leader (pid %d) are zombies while its command runs", z, cmd.Process.Pid)
	}
}

// TestStoppedGroupNotKilledAtLinger: on a stop the supervisor sends the
// group SIGTERM; the leader, its command and the server all get it. If
// the leader saw its command's exit before the signal (two channels in
// one select, both ready, or the signal still in the runtime's queue),
// it took the stop for a command that ended by itself: it sent the group
// a second SIGTERM and SIGKILLed the server at groupLinger (10 s), before
// the service's StopTimeout (3 of 12 runs of 9b1981d, from a review). The
// server here counts the SIGTERMs it gets: one, the stop's.
func TestStoppedGroupNotKilledAtLinger(t *testing.T) {
	for i := 0; i < 12; i++ {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			terms, late, ready := filepath.Join(dir, "terms"), filepath.Join(dir, "late"), filepath.Join(dir, "ready")
			server := filepath.Join(dir, "server.sh")
			script := "trap 'echo term >>" + terms + "; stop=1' TERM\necho up >" + ready + "\n" +
				"while [ -z \"$stop\" ]; do sleep 0.05; done\nsleep 0.5\necho flushed >" + late + "\n"
			if err := os.WriteFile(server, []byte(script), 0o755); err != nil {
				t.Fatal(err)
			}
			cmd := startGroup(t, "sh "+server+"; true")
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
				if _, err := os.Stat(ready); err == nil {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the server did not start")
				}
			}
			unix.Kill(-cmd.Process.Pid, unix.SIGTERM)
			err := cmd.Wait()
			b, _ := os.ReadFile(terms)
			if n := strings.Count(string(b), "term"); n != 1 {
				t.Errorf("the server got %d SIGTERMs on one stop: the leader took the stop for its command's own exit (and would SIGKILL the server at groupLinger)", n)
			}
			if _, lerr := os.Stat(late); lerr != nil {
				t.Errorf("stopped group: the leader exited (%v) before the server finished shutting down", err)
			}
		})
	}
}

// TestSetsidDescendantDiesWithSupervisor: a service process that left
// the group (setsid: PostgreSQL's backends, any daemonizing helper) is
// not reached by the leader's kill(-pgrp, SIGKILL) on the supervisor's
// death; the leader died with that kill, the last copy of the listener
// closed, and the descendant's durability calls got ENOSYS. From a review
// of 5d3f1b2 (failed on it). The leader now kills every descendant and
// stays until none is left.
func TestSetsidDescendantDiesWithSupervisor(t *testing.T) {
	dir := t.TempDir()
	file, result, pidFile := filepath.Join(dir, "data"), filepath.Join(dir, "result"), filepath.Join(dir, "pid")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	sup, _ := startSupervisor(t, true,
		"DUET_BARRIER_SUPERVISOR=DUET_BARRIER_SUPERVISOR= setsid '"+self+"' & wait",
		"DUET_BARRIER_HELPER=fdatasync-loop", "DUET_BARRIER_FILE="+file,
		"DUET_BARRIER_RESULT="+result, "DUET_BARRIER_PIDFILE="+pidFile)
	defer func() { sup.Process.Kill(); sup.Wait() }()
	pid := waitPidFile(t, pidFile)
	defer unix.Kill(pid, unix.SIGKILL)
	waitCalling(t, result)
	sup.Process.Kill()
	sup.Wait()
	gone := waitGone(pid, 3*time.Second)
	b, _ := os.ReadFile(result)
	if !gone {
		t.Errorf("a setsid'd process of the service (pid %d) outlived its SIGKILLed supervisor", pid)
	}
	if string(b) != "calling\n" {
		t.Errorf("its durability call returned after the supervisor died: %q", b)
	}
}
