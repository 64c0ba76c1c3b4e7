package lab

import (
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The k3s module's lab: MariaDB, duet's NFS server and kine started by duet on
// the primary behind the VIP, real clients in the client namespace.

// stackTools finds the programs the k3s lab needs; a missing one skips
// the test, or fails it when DUET_REQUIRE_STACK is set (CI installs them).
func stackTools(t *testing.T) map[string]string {
	t.Helper()
	found, missing := findStackTools()
	if len(missing) > 0 {
		msg := fmt.Sprintf("k3s stack tools not installed: %s (apt-get install mariadb-server etcd-client; go install github.com/k3s-io/kine@v0.17.5)",
			strings.Join(missing, ", "))
		if os.Getenv("DUET_REQUIRE_STACK") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return found
}

// findStackTools looks the k3s lab's programs up.
func findStackTools() (found map[string]string, missing []string) {
	found = map[string]string{}
	for _, tool := range []string{"mariadbd", "mariadb-install-db", "mariadb", "etcdctl", "kine"} {
		p, err := exec.LookPath(tool)
		if err != nil && tool == "kine" {
			// go install puts it in GOBIN or GOPATH/bin.
			for _, dir := range []string{os.Getenv("GOBIN"), filepath.Join(os.Getenv("HOME"), "go/bin"), "/root/go/bin"} {
				if c := filepath.Join(dir, "kine"); dir != "" && isExec(c) {
					p, err = c, nil
					break
				}
			}
		}
		if err != nil {
			missing = append(missing, tool)
			continue
		}
		found[tool] = p
	}
	return found, missing
}

func isExec(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode()&0o111 != 0
}

const k3sPassword = "lab-Password-0123456789"

// k3sLab brings the lab up with the k3s module on both hosts and nodeA
// serving the stack.
func k3sLab(t *testing.T) *Lab {
	tools := stackTools(t)
	l := Up(t, Binary(t, t.TempDir()))
	addK3SModule(t, l, tools)
	l.Start(t, "a")
	l.Start(t, "b")
	l.waitServices(t, "a", time.Minute)
	l.WaitSync(t, 2*time.Minute)
	return l
}

// addK3SModule configures the k3s module on both hosts. Kubernetes is
// replaced by a kubectl that logs its arguments (k3s cannot be installed
// here) and answers the hooks' `get node` with Unknown, as Kubernetes does
// for a node whose kubelet went silent. peer_lost_after (60 s by default)
// is 10 s, so that the taint comes within a run, yet longer than a restart
// of the daemon (about 4.5 s of silence here: 3 s tainted a restart).
func addK3SModule(t *testing.T, l *Lab, tools map[string]string) {
	pw := filepath.Join(l.Dir, "k3s.password")
	kubectl := filepath.Join(l.Dir, "kubectl")
	must(t, os.WriteFile(pw, []byte(k3sPassword+"\n"), 0o600))
	must(t, os.WriteFile(kubectl, []byte("#!/bin/sh\necho \"$DUET_NODE $*\" >> "+filepath.Join(l.Dir, "kubectl.log")+
		"\ncase $1 in get) echo Unknown ;; esac\n"), 0o755))
	for _, h := range []string{"a", "b"} {
		data := filepath.Join(l.Dir, h, "k3s")
		for _, d := range []string{"mysql", "nfs"} {
			must(t, os.MkdirAll(filepath.Join(data, d), 0o755))
		}
		l.AppendConfig(t, h, fmt.Sprintf(`module: k3s
k3s:
  data_dir: %s
  password_file: %s
  mysql_user: root
  mariadbd: %s
  mariadb_install_db: %s
  mariadb_client: %s
  kine: 0.0.0.0:2379
  kine_bin: %s
  etcdctl: %s
  kubectl: %s
hooks:
  peer_lost_after: 10s
`, data, pw, tools["mariadbd"], tools["mariadb-install-db"], tools["mariadb"], tools["kine"], tools["etcdctl"], kubectl))
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// waitServices waits until host serves with every service healthy.
func (l *Lab) waitServices(t *testing.T, host string, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		s, err := l.TryStatus(host)
		// The module's three services, and any others configured.
		healthy := err == nil && len(s.Services) >= 3
		for _, sv := range s.Services {
			healthy = healthy && sv.Healthy
		}
		if healthy {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("services of %s not healthy after %s: %+v (%v)", host, timeout, s.Services, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// client runs one kind of request through the VIP from the client
// namespace, numbering them, and records what was acknowledged.
type client struct {
	name string
	l    *Lab
	gate *sync.RWMutex // held for writing while the data is checked
	op   func(ctx context.Context, n int) error
	// have, when set, reads back what the service holds (else
	// Lab.present).
	have func(t *testing.T) map[int]bool
	// explain, when set, says what the read back saw of a missing entry.
	explain func(n int) string
	// notCommitted, when set, says why a missing entry, acknowledged at
	// at, was never committed by the primary's own datastore (an
	// acknowledgement duet could not have kept), or "" (a loss).
	notCommitted func(n int, at time.Time) string
	mu           sync.Mutex
	next         int
	acked        []int
	oks          []time.Time // when each success returned
	fails        int
}

// ipc runs a command in the client namespace.
func (l *Lab) ipc(ctx context.Context, env []string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", "duet-c"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	return cmd.CombinedOutput()
}

// ipcInput is ipc with input on the standard input and the standard
// output alone: a client's warnings on its standard error (etcdctl's,
// while the VIP moves) are not part of the answer.
func (l *Lab) ipcInput(ctx context.Context, env []string, input string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", "duet-c"}, args...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = strings.NewReader(input)
	return cmd.Output()
}

func (c *client) run(ctx context.Context) {
	for ctx.Err() == nil {
		c.mu.Lock()
		c.next++
		n := c.next
		c.mu.Unlock()
		c.gate.RLock()
		octx, cancel := context.WithTimeout(ctx, 3*time.Second)
		err := c.op(octx, n)
		cancel()
		c.gate.RUnlock()
		c.mu.Lock()
		if err == nil {
			c.acked = append(c.acked, n)
			c.oks = append(c.oks, time.Now())
		} else {
			c.fails++
		}
		c.mu.Unlock()
		if err != nil {
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// outage is the longest time between two successes around the kill.
func (c *client) outage(kill time.Time) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var worst time.Duration
	for i := 1; i < len(c.oks); i++ {
		if c.oks[i].After(kill) && c.oks[i-1].Before(kill.Add(time.Second)) {
			worst = max(worst, c.oks[i].Sub(c.oks[i-1]))
		}
	}
	return worst
}

// longestGap is the longest time in [from, to] without a success.
func (c *client) longestGap(from, to time.Time) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	last, worst := from, time.Duration(0)
	for _, ok := range c.oks {
		if ok.Before(from) || ok.After(to) {
			continue
		}
		worst = max(worst, ok.Sub(last))
		last = ok
	}
	return max(worst, to.Sub(last))
}

func (c *client) successesAfter(t0 time.Time) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, ok := range c.oks {
		if ok.After(t0) {
			n++
		}
	}
	return n
}

func mysqlEnv() []string { return []string{"MYSQL_PWD=" + k3sPassword} }

func (l *Lab) mysql(ctx context.Context, sql string) ([]byte, error) {
	return l.ipc(ctx, mysqlEnv(), "mariadb", "--no-defaults", "-h", vipAddr, "-u", "kine", "--connect-timeout=2", "-N", "-B", "-e", sql, "kine")
}

// k3sClients are the three clients of the issue: etcd puts through kine,
// MariaDB commits, files written over NFSv4.
func k3sClients(t *testing.T, l *Lab, gate *sync.RWMutex) []*client {
	cs := []*client{
		{name: "etcd", l: l, op: func(ctx context.Context, n int) error {
			out, err := l.ipc(ctx, []string{"ETCDCTL_API=3"}, "etcdctl", "--endpoints", "http://"+vipAddr+":2379",
				"--dial-timeout", "1s", "--command-timeout", "2s", "put", fmt.Sprintf("/counter/%d", n), strconv.Itoa(n))
			if err == nil && strings.TrimSpace(string(out)) != "OK" {
				err = fmt.Errorf("etcdctl put: %s", out)
			}
			return err
		}},
		{name: "mysql", l: l, op: func(ctx context.Context, n int) error {
			_, err := l.mysql(ctx, fmt.Sprintf("INSERT INTO acks (id, v) VALUES (%d, 'row %d')", n, n))
			return err
		}},
		nfsClient(t, l),
	}
	for _, c := range cs {
		c.gate = gate
	}
	return cs
}

// present lists what the service behind the VIP holds, per client.
func (l *Lab) present(t *testing.T, name string) map[int]bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got := map[int]bool{}
	var out []byte
	var err error
	switch name {
	case "etcd":
		out, err = l.ipc(ctx, []string{"ETCDCTL_API=3"}, "etcdctl", "--endpoints", "http://"+vipAddr+":2379", "get", "--prefix", "/counter/", "--print-value-only")
		for _, f := range strings.Fields(string(out)) {
			n, _ := strconv.Atoi(f)
			got[n] = true
		}
	case "mysql":
		out, err = l.mysql(ctx, "SELECT id, v FROM acks")
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			id, v, _ := strings.Cut(line, "\t")
			if n, _ := strconv.Atoi(id); v == "row "+id {
				got[n] = true
			}
		}
	}
	if err != nil {
		t.Fatalf("reading back %s through the VIP: %v\n%s", name, err, out)
	}
	return got
}

// check counts, for each client, acknowledged entries missing behind the
// VIP. The clients wait while the data is read back.
func (l *Lab) check(t *testing.T, clients []*client) (acked, lost map[string]int) {
	acked, lost = map[string]int{}, map[string]int{}
	if len(clients) > 0 {
		clients[0].gate.Lock()
		defer clients[0].gate.Unlock()
	}
	for _, c := range clients {
		var have map[int]bool
		if c.have != nil {
			have = c.have(t)
		} else {
			have = l.present(t, c.name)
		}
		c.mu.Lock()
		list := append([]int(nil), c.acked...)
		oks := append([]time.Time(nil), c.oks...)
		c.mu.Unlock()
		var missing []int
		var when []string // when the first and the last missing one were acknowledged
		for i, n := range list {
			if !have[n] {
				if c.notCommitted != nil {
					if why := c.notCommitted(n, oks[i]); why != "" {
						t.Logf("%s: entry %d, acknowledged at %s, is missing, and was never committed: %s", c.name, n, oks[i].Format("15:04:05.000"), why)
						continue
					}
				}
				missing = append(missing, n)
				if at := oks[i].Format("15:04:05.000"); len(when) < 2 {
					when = append(when, at)
				} else {
					when[1] = at
				}
			}
		}
		acked[c.name], lost[c.name] = len(list), len(missing)
		if len(missing) > 0 {
			l.Errorf(t, "%s: %d acknowledged entries missing behind the VIP: %v (acknowledged at %s)", c.name, len(missing), first(missing, 20), strings.Join(when, " to "))
			if c.explain != nil {
				for _, n := range first(missing, 5) {
					t.Logf("%s: %s", c.name, c.explain(n))
				}
			}
		}
	}
	return acked, lost
}

func first[T any](s []T, n int) []T {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// TestK3SStackFailover runs the three clients through the VIP, kills the
// primary (every process, link down) at a random moment, and checks on
// the survivor that every acknowledged key, row and file is there; the
// old primary comes back, resyncs, and the next run kills the other
// node. At the end `duet swap` moves the stack back to nodeA, then to
// nodeB and back. The NFS client mounts once and keeps its handles
// through all of it: a stale handle fails the test.
func TestK3SStackFailover(t *testing.T) {
	runs := 5
	if s := os.Getenv("DUET_K3S_RUNS"); s != "" {
		runs, _ = strconv.Atoi(s)
	}
	l := k3sLab(t)
	ctx0, cancel0 := context.WithTimeout(context.Background(), 30*time.Second)
	if out, err := l.mysql(ctx0, "CREATE TABLE acks (id BIGINT PRIMARY KEY, v VARCHAR(64)) ENGINE=InnoDB"); err != nil {
		t.Fatalf("creating the table: %v\n%s", err, out)
	}
	cancel0()
	var gate sync.RWMutex
	clients := k3sClients(t, l, &gate)
	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.run(ctx)
		}()
	}
	defer func() {
		stop()
		wg.Wait()
	}()
	// A restart of the standby's daemon, clean (systemctl restart) and
	// after a crash of the daemon alone: its host never went down, so
	// nothing may taint it (the old hooks tainted after 1.5 s of silence).
	l.Stop(t, "b")
	l.Start(t, "b")
	l.WaitState(t, "b", "SECOND", time.Minute)
	l.Kill(t, "b")
	l.Start(t, "b")
	l.WaitState(t, "b", "SECOND", time.Minute)
	time.Sleep(5 * time.Second)
	if b, _ := os.ReadFile(filepath.Join(l.Dir, "kubectl.log")); strings.Contains(string(b), "taint") {
		t.Fatalf("restarts of nodeB's daemon tainted it:\n%s", b)
	}
	seed := time.Now().UnixNano()
	rng := rand.New(rand.NewSource(seed))
	// Besides the counters, a history of puts and gets on a few keys,
	// checked for linearizability at the end.
	hist := startEtcdHistory(ctx, t, l, 3, 6, seed, nil)
	defer func() {
		stop()
		hist.wg.Wait()
	}()
	p := "a"
	type result struct {
		acked, lost map[string]int
		outage      map[string]time.Duration
	}
	var results []result
	var totalLost int
	for i := 0; i < runs; i++ {
		s := otherHost[p]
		// Load, then the kill at a random moment.
		time.Sleep(time.Duration(2000+rng.Intn(3000)) * time.Millisecond)
		os.Remove(filepath.Join(l.Dir, "kubectl.log"))
		kill := time.Now()
		if out, err := l.run("crash", p); err != nil {
			t.Fatalf("crash %s: %v\n%s", p, err, out)
		}
		// Every client must be served again by the survivor.
		deadline := time.Now().Add(time.Minute)
		for _, c := range clients {
			for c.successesAfter(kill.Add(500*time.Millisecond)) < 3 {
				if time.Now().After(deadline) {
					st, _ := l.TryStatus(s)
					l.Fatalf(t, "run %d: %s not served again a minute after %s died; %s: %s %+v", i, c.name, nodeName[p], nodeName[s], st.State, st.Services)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		r := result{outage: map[string]time.Duration{}}
		for _, c := range clients {
			r.outage[c.name] = c.outage(kill)
		}
		r.acked, r.lost = l.check(t, clients)
		for _, n := range r.lost {
			totalLost += n
		}
		results = append(results, r)
		t.Logf("run %d: %s killed; through the VIP on %s: etcd %d acknowledged, %d lost; mysql %d, %d lost; nfs %d, %d lost; no service for etcd %s, mysql %s, nfs %s",
			i+1, nodeName[p], nodeName[s], r.acked["etcd"], r.lost["etcd"], r.acked["mysql"], r.lost["mysql"], r.acked["nfs"], r.lost["nfs"],
			r.outage["etcd"].Round(10*time.Millisecond), r.outage["mysql"].Round(10*time.Millisecond), r.outage["nfs"].Round(10*time.Millisecond))
		if t.Failed() {
			t.FailNow()
		}
		// The lost node's Kubernetes node was taken out of service,
		// once silent for peer_lost_after and NotReady.
		l.waitKubectl(t, nodeName[s]+" taint nodes "+strings.ToLower(nodeName[p])+" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute --overwrite")
		// The old primary returns (as after a reboot), resyncs, mirrors.
		l.run("revive", p)
		l.Start(t, p)
		l.WaitState(t, p, "SECOND", 2*time.Minute)
		l.waitKubectl(t, nodeName[s]+" taint nodes "+strings.ToLower(nodeName[p])+" node.kubernetes.io/out-of-service-")
		p = s
	}
	// Failback: the returned node takes the stack back with duet swap,
	// under load (after an odd number of runs: nodeA, the first primary);
	// then a swap the other way and back, and the clients (the NFS
	// volume on the handles of its one mount) follow each move.
	for i := 0; i < 3; i++ {
		l.WaitSync(t, 2*time.Minute)
		to := otherHost[p]
		t0 := time.Now()
		if out, code := l.Duet(t, p, "swap"); code != 0 {
			t.Fatalf("swap: %s", out)
		}
		l.waitServices(t, to, time.Minute)
		t1 := time.Now()
		for _, c := range clients {
			for c.successesAfter(t1) < 3 {
				if time.Since(t1) > time.Minute {
					l.Fatalf(t, "%s not served a minute after the swap to %s", c.name, nodeName[to])
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		var swapOut []string
		for _, c := range clients {
			swapOut = append(swapOut, fmt.Sprintf("%s %s", c.name, c.outage(t0).Round(10*time.Millisecond)))
		}
		t.Logf("swap: the stack moved from %s to %s; no service for %s", nodeName[p], nodeName[to], strings.Join(swapOut, ", "))
		p = to
	}
	stop()
	wg.Wait()
	hist.check(t)
	acked, lost := l.check(t, clients)
	t.Logf("after the swap: etcd %d acknowledged, %d lost; mysql %d, %d lost; nfs %d, %d lost",
		acked["etcd"], lost["etcd"], acked["mysql"], lost["mysql"], acked["nfs"], lost["nfs"])
	var outs []time.Duration
	for _, r := range results {
		for _, o := range r.outage {
			outs = append(outs, o)
		}
	}
	sort.Slice(outs, func(i, j int) bool { return outs[i] < outs[j] })
	t.Logf("k3s stack: %d failovers, %d acknowledged entries lost; client-seen outage min %s, median %s, max %s",
		runs, totalLost, outs[0].Round(10*time.Millisecond), outs[len(outs)/2].Round(10*time.Millisecond), outs[len(outs)-1].Round(10*time.Millisecond))
}

// waitKubectl waits until the fake kubectl logged line.
func (l *Lab) waitKubectl(t *testing.T, line string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, _ := os.ReadFile(filepath.Join(l.Dir, "kubectl.log"))
		for _, got := range strings.Split(string(b), "\n") {
			if got == line {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("kubectl was not run as %q; it ran:\n%s", line, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
