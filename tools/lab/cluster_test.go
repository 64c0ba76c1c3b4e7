package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

var nodeName = map[string]string{"a": "nodeA", "b": "nodeB"}
var otherHost = map[string]string{"a": "b", "b": "a"}

const vipAddr = "10.250.0.100"

// buildTool builds ./tools/<name> next to the duet binary.
func buildTool(t *testing.T, name string) string {
	t.Helper()
	out := filepath.Join(filepath.Dir(duetBinary(t)), name)
	cmd := exec.Command("go", "build", "-o", out, "./tools/"+name)
	cmd.Dir = repoRoot()
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", name, err, b)
	}
	return out
}

// clusterLab is a lab whose nodes run the hello service behind the VIP,
// nodeA serving and nodeB in sync.
func clusterLab(t *testing.T, start bool) (*Lab, string) {
	hello := buildTool(t, "hello")
	l := Up(t, duetBinary(t))
	for _, h := range []string{"a", "b"} {
		l.AppendConfig(t, h, fmt.Sprintf(`services:
  - name: hello
    start: %s serve -listen 0.0.0.0:8080 -name %s
    check_tcp: 127.0.0.1:8080
    check_interval: 500ms
`, hello, nodeName[h]))
	}
	if start {
		l.Start(t, "b")
		l.Start(t, "a")
		l.WaitState(t, "a", "PRIM", 30*time.Second)
		l.WaitState(t, "b", "SECOND", 30*time.Second)
	}
	return l, hello
}

// connect reaches the service through the VIP from the client namespace
// and returns the milliseconds since `since` and the answer.
func (l *Lab) connect(t *testing.T, hello string, since time.Time) (int, string) {
	t.Helper()
	out, err := l.run("exec", "c", hello, "connect", "-addr", vipAddr+":8080",
		"-since", strconv.FormatInt(since.UnixNano(), 10), "-timeout", "30s")
	if err != nil {
		t.Fatalf("client: %v\n%s", err, out)
	}
	f := strings.SplitN(strings.TrimSpace(out), " ", 2)
	ms, _ := strconv.Atoi(f[0])
	return ms, f[1]
}

// TestFailover kills the primary host (every process, link down) again
// and again: each time the client must reach the service on the survivor
// through the VIP, and the old primary must come back as secondary.
func TestFailover(t *testing.T) {
	runs := 10
	if s := os.Getenv("DUET_FAILOVER_RUNS"); s != "" {
		runs, _ = strconv.Atoi(s)
	}
	l, hello := clusterLab(t, true)
	if _, ans := l.connect(t, hello, time.Now()); ans != "hello from nodeA" {
		t.Fatalf("before any failover the client got %q", ans)
	}
	var times []int
	p := "a"
	for i := 0; i < runs; i++ {
		s := otherHost[p]
		NewWorkload(map[string]string{"a": l.AData, "b": l.BData}[p], int64(i+1)).Run(100)
		l.WaitSync(t, time.Minute)
		ms, ans := l.askDuring(t, hello, nodeName[s], func() {
			if out, err := l.run("crash", p); err != nil {
				t.Fatalf("crash %s: %v\n%s", p, err, out)
			}
		})
		if ans != "hello from "+nodeName[s] {
			t.Fatalf("run %d: after %s died the client got %q", i, nodeName[p], ans)
		}
		t.Logf("run %2d: %s killed, service answered from %s after %d ms", i, nodeName[p], nodeName[s], ms)
		times = append(times, ms)
		l.WaitState(t, s, "ALONE", 10*time.Second)
		l.run("revive", p)
		l.Start(t, p)
		l.WaitState(t, p, "SECOND", time.Minute)
		p = s
	}
	l.WaitSync(t, time.Minute)
	l.Verify(t)
	// The survivor's metrics tell the story.
	metrics, err := l.run("exec", p, hello, "get", "-url", "http://127.0.0.1:9788/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v\n%s", nodeName[p], err, metrics)
	}
	for _, want := range []string{`duet_state{state="PRIM"} 1`, "duet_vip_held 1", "duet_in_sync 1",
		"duet_peer_seen 1", `duet_service_healthy{service="hello"} 1`, "duet_barrier_seconds_count"} {
		if !strings.Contains(metrics, want) {
			t.Fatalf("metrics of %s lack %q:\n%s", nodeName[p], want, metrics)
		}
	}
	// The page as Prometheus reads it: promtool's parser and lint
	// (Debian's prometheus package; CI installs it).
	if _, err := exec.LookPath("promtool"); err == nil {
		check := exec.Command("promtool", "check", "metrics")
		check.Stdin = strings.NewReader(metrics)
		if out, err := check.CombinedOutput(); err != nil {
			t.Fatalf("promtool check metrics on %s's scrape: %v\n%s", nodeName[p], err, out)
		}
		t.Logf("promtool check metrics on %s's scrape: ok", nodeName[p])
	} else if os.Getenv("DUET_REQUIRE_STACK") != "" {
		t.Fatal("promtool not installed (Debian package prometheus), and DUET_REQUIRE_STACK is set")
	} else {
		t.Log("promtool not installed: the live scrape is not checked by it")
	}
	for _, line := range strings.Split(metrics, "\n") {
		if strings.HasPrefix(line, "duet_peer_lost_total ") || strings.HasPrefix(line, "duet_barrier_seconds_count ") {
			t.Logf("metrics of %s: %s", nodeName[p], line)
		}
	}
	sort.Ints(times)
	t.Logf("failover, kill to first answer through the VIP over %d runs: min %d ms, median %d ms, max %d ms",
		runs, times[0], times[len(times)/2], times[len(times)-1])
	// The 1.2 s timeout, the checks and the service's start take about
	// 1.3 s at most in the lab (tools/bench -only failover); issue 16's
	// bound is 2.0 s, and this test's margin over it is for a loaded CI
	// machine.
	if times[len(times)-1] > 2500 {
		t.Fatalf("slowest failover took %d ms: over 2.5 s", times[len(times)-1])
	}
}

// askDuring has the client ask the service through the VIP, from just
// before fault runs, until want answers, and returns the milliseconds
// from the fault's start to that answer and the answer. The client asks
// from before the fault: lab.sh crash returns only once the host's
// daemon is gone, which may take longer than the failover.
func (l *Lab) askDuring(t *testing.T, hello, want string, fault func()) (int, string) {
	t.Helper()
	start := time.Now().Add(300 * time.Millisecond)
	answered := make(chan string, 1)
	go func() {
		out, err := l.run("exec", "c", hello, "connect", "-addr", vipAddr+":8080",
			"-since", strconv.FormatInt(start.UnixNano(), 10), "-timeout", "30s", "-want", want)
		if err != nil {
			out = err.Error() + ": " + out
		}
		answered <- strings.TrimSpace(out)
	}()
	time.Sleep(time.Until(start))
	fault()
	ans := <-answered
	f := strings.SplitN(ans, " ", 2)
	ms, err := strconv.Atoi(f[0])
	if err != nil || len(f) < 2 {
		t.Fatalf("the client asking for %s got %q", want, ans)
	}
	return ms, f[1]
}

// TestLinkCutNoSplitBrain cuts only the path between the nodes: nodeB no
// longer hears nodeA but nodeA still answers for the VIP, so nodeB must
// not take over; at no moment may two hosts answer ARP for the VIP.
func TestLinkCutNoSplitBrain(t *testing.T) {
	l, hello := clusterLab(t, true)
	NewWorkload(l.AData, 3).Run(200)
	watch := exec.Command(l.Script, "exec", "c", hello, "arpwatch", "-vip", vipAddr+"/24", "-for", "9s")
	watch.Env = l.env
	var wout strings.Builder
	watch.Stdout, watch.Stderr = &wout, &wout
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	l.run("exec", "a", "ip", "route", "add", "blackhole", "10.250.0.2/32")
	l.run("exec", "b", "ip", "route", "add", "blackhole", "10.250.0.1/32")
	time.Sleep(5 * time.Second)
	sa, sb := l.Status(t, "a"), l.Status(t, "b")
	t.Logf("link cut: nodeA %s (vip held %v), nodeB %s (vip held %v)", sa.State, sa.VIP.Held, sb.State, sb.VIP.Held)
	if sb.State == "PRIM" || sb.State == "ALONE" || sb.VIP.Held {
		t.Fatalf("nodeB took over while nodeA still served")
	}
	if !sa.VIP.Held {
		t.Fatalf("nodeA gave up the VIP on a link cut it survived")
	}
	NewWorkload(l.AData, 4).Run(200) // written while nodeB cannot get it
	l.run("exec", "a", "ip", "route", "del", "blackhole", "10.250.0.2/32")
	l.run("exec", "b", "ip", "route", "del", "blackhole", "10.250.0.1/32")
	if err := watch.Wait(); err != nil {
		t.Fatalf("arpwatch: %v\n%s", err, wout.String())
	}
	f := strings.Fields(wout.String())
	t.Logf("ARP for the VIP seen from the client: at most %s host(s) answering in one round, %s rounds, MACs %s", f[0], f[1], f[2])
	if f[0] != "1" || strings.Contains(f[2], ",") {
		t.Fatalf("two hosts answered for the VIP: %s", wout.String())
	}
	l.WaitState(t, "b", "SECOND", time.Minute)
	l.WaitSync(t, time.Minute)
	l.Verify(t)
}

// TestSwapTwice moves the service to nodeB and back with duet swap, while
// a writer under duet exec appends and fdatasyncs records on the primary:
// every record it was told is durable must be on the new primary.
func TestSwapTwice(t *testing.T) {
	l, hello := clusterLab(t, true)
	writer := buildTool(t, "syncwriter")
	data := map[string]string{"a": l.AData, "b": l.BData}
	for i, p := range []string{"a", "b"} {
		s := otherHost[p]
		NewWorkload(data[p], int64(10+i)).Run(500)
		// The primary must see the peer in sync (its heartbeats lag the
		// peer's own state by up to an interval), or swap refuses.
		l.WaitSync(t, time.Minute)
		name := fmt.Sprintf("swap-log-%d", i)
		w := l.startSyncWriter(t, writer, p, filepath.Join(data[p], name))
		time.Sleep(300 * time.Millisecond)
		out, code := l.Duet(t, p, "swap")
		if code != 0 {
			t.Fatalf("swap on %s: exit %d\n%s", p, code, out)
		}
		t.Logf("swap on %s: %s", nodeName[p], strings.TrimSpace(out))
		acked, stderr := w.wait(t, "the swap")
		got, _ := os.ReadFile(filepath.Join(data[s], name))
		if n := missingRecords(acked, got); n != 0 {
			src, _ := os.ReadFile(filepath.Join(data[p], name))
			t.Fatalf("%d of %d acknowledged records are not on %s (its copy %d bytes, %s's %d: records of 16 bytes)",
				n, acked, nodeName[s], len(got), nodeName[p], len(src))
		}
		t.Logf("writer during the swap: %d records acknowledged, all on %s (writer: %s)", acked, nodeName[s], stderr)
		if acked == 0 {
			t.Fatal("no record was acknowledged before the swap: the check exercised nothing")
		}
		if _, ans := l.connect(t, hello, time.Now()); ans != "hello from "+nodeName[s] {
			t.Fatalf("after the swap the client got %q", ans)
		}
		l.WaitState(t, p, "SECOND", time.Minute)
		l.WaitSync(t, time.Minute)
		l.Verify(t)
	}
	// Each node has stopped its services once: neither daemon may be left
	// busy by them (the listener of a stopped service's calls spun a CPU
	// for the daemon's life). Idle here, a daemon uses about 1 %.
	for _, h := range []string{"a", "b"} {
		share := l.CPUShare(t, h, 2*time.Second)
		t.Logf("%s idle after the swaps: %.0f %% of a CPU", nodeName[h], 100*share)
		if share > 0.5 {
			t.Errorf("%s's daemon uses %.0f %% of a CPU while idle after the swaps", nodeName[h], 100*share)
		}
	}
	// A swap towards a peer that is not in sync is refused.
	l.Kill(t, "b")
	l.WaitState(t, "a", "ALONE", 10*time.Second)
	out, code := l.Duet(t, "a", "swap")
	if code == 0 || !strings.Contains(out, "not in sync") {
		t.Fatalf("swap without a peer: exit %d\n%s", code, out)
	}
	t.Logf("swap without a peer: %s", strings.TrimSpace(out))
}

// TestClusterBadInput: a VIP on a missing interface, a VIP already used
// by another host, an unreachable peer: each a clear message, and nothing
// started that should not be.
func TestClusterBadInput(t *testing.T) {
	l, hello := clusterLab(t, false)
	_ = hello
	cfg, _ := os.ReadFile(filepath.Join(l.Dir, "a.yaml"))
	os.WriteFile(filepath.Join(l.Dir, "a.yaml"), []byte(strings.Replace(string(cfg), "interface: eth0", "interface: eth9", 1)), 0o644)
	out, err := l.run("start", "a")
	if err == nil || !strings.Contains(out, `vip interface "eth9"`) {
		t.Fatalf("VIP on a missing interface: start did not fail clearly (%v):\n%s", err, out)
	}
	t.Logf("VIP on a missing interface: %s", grepLine(out, "eth9"))
	os.WriteFile(filepath.Join(l.Dir, "a.yaml"), cfg, 0o644)

	// Another host already uses the VIP: nodeA (alone, reference copy)
	// must not take it. Whoever answers for the VIP may be its peer,
	// serving behind a cut of the heartbeats: nodeA counts its copy as
	// stale (docs/DESIGN.md §7, "A check that finds the role held") and
	// does not take the address once it is free; the operator decides.
	l.run("exec", "c", "ip", "addr", "add", vipAddr+"/24", "dev", "eth0")
	l.Start(t, "a")
	time.Sleep(4 * time.Second)
	sa := l.Status(t, "a")
	if sa.State != "WAIT" || sa.VIP.Held || len(sa.Services) != 0 || !sa.Stale {
		t.Fatalf("VIP in use elsewhere: nodeA is %s (stale %v), vip held %v, services %+v", sa.State, sa.Stale, sa.VIP.Held, sa.Services)
	}
	log, _ := os.ReadFile(filepath.Join(l.Dir, "a.log"))
	if !strings.Contains(string(log), "is answered by") {
		t.Fatalf("the log does not say why nodeA waits:\n%s", tail(log, 2000))
	}
	t.Logf("VIP in use: nodeA %s, log says %q", sa.State, grepLine(string(log), "is answered by"))
	l.run("exec", "c", "ip", "addr", "del", vipAddr+"/24", "dev", "eth0")
	time.Sleep(2 * time.Second)
	if sa := l.Status(t, "a"); sa.State != "WAIT" || sa.VIP.Held {
		t.Fatalf("the VIP freed: nodeA took it on its own (%s, vip held %v)", sa.State, sa.VIP.Held)
	}
	if out, code := l.Duet(t, "a", "prim", "--force"); code != 0 {
		t.Fatalf("duet prim --force on nodeA: exit %d\n%s", code, out)
	}
	l.WaitState(t, "a", "ALONE", 10*time.Second)
	l.Stop(t, "a")

	// nodeB started alone holds a copy that may be stale: it waits, and
	// `duet prim` is refused unless forced.
	os.RemoveAll(filepath.Join(l.Dir, "a/.duet/cluster.json"))
	l.Start(t, "b")
	time.Sleep(3 * time.Second)
	sb := l.Status(t, "b")
	if sb.State != "WAIT" || sb.VIP.Held || sb.PeerState.Seen {
		t.Fatalf("nodeB alone: %s, vip held %v", sb.State, sb.VIP.Held)
	}
	out, code := l.Duet(t, "b", "prim")
	if code == 0 || !strings.Contains(out, "--force") {
		t.Fatalf("duet prim on a stale copy: exit %d\n%s", code, out)
	}
	t.Logf("duet prim on nodeB: %s", strings.TrimSpace(out))
	out, code = l.Duet(t, "b", "prim", "--force")
	if code != 0 {
		t.Fatalf("duet prim --force: exit %d\n%s", code, out)
	}
	l.WaitState(t, "b", "ALONE", 10*time.Second)
	if ms, ans := l.connect(t, hello, time.Now()); ans != "hello from nodeB" {
		t.Fatalf("after prim --force the client got %q (%d ms)", ans, ms)
	}
}

func grepLine(s, sub string) string {
	for _, line := range strings.Split(s, "\n") {
		if strings.Contains(line, sub) {
			return line
		}
	}
	return ""
}

// TestStopHandsOver: stopping the primary's daemon (SIGTERM, as systemctl
// stop or a reboot does) hands the role over like `duet swap`: the peer
// serves without waiting for the fault-detection timeout, and nothing a
// supervised writer was told is durable is lost.
func TestStopHandsOver(t *testing.T) {
	l, hello := clusterLab(t, true)
	writer := buildTool(t, "syncwriter")
	l.WaitSync(t, time.Minute)
	w := l.startSyncWriter(t, writer, "a", filepath.Join(l.AData, "stop-log"))
	time.Sleep(300 * time.Millisecond)
	var stopped time.Duration
	ms, ans := l.askDuring(t, hello, "nodeB", func() {
		start := time.Now()
		l.Stop(t, "a")
		stopped = time.Since(start)
	})
	if ans != "hello from nodeB" {
		t.Fatalf("after nodeA's daemon stopped the client got %q", ans)
	}
	acked, stderr := w.wait(t, "the stop")
	got, _ := os.ReadFile(filepath.Join(l.BData, "stop-log"))
	if n := missingRecords(acked, got); n != 0 {
		t.Fatalf("%d of %d acknowledged records are not on nodeB", n, acked)
	}
	s := l.Status(t, "b")
	t.Logf("SIGTERM of nodeA's daemon: stopped in %d ms, service answered by nodeB %d ms after the signal (%s); writer: %d records acknowledged, all on nodeB (%s)",
		stopped.Milliseconds(), ms, s.State, acked, stderr)
	log, _ := os.ReadFile(filepath.Join(l.Dir, "b.log"))
	if !strings.Contains(string(log), "handed over by nodeA") {
		t.Fatal("nodeB took over, but not by a handover (see b.log)")
	}
	// lab.sh stop kills the daemon after 10 s: a stop that needs it did
	// not end by itself (once: a barrier waited out its 10 s drain bound,
	// and the handover with it).
	if stopped > 8*time.Second {
		t.Fatalf("nodeA's daemon took %v to stop", stopped)
	}
	if ms > 5000 {
		t.Fatalf("the service answered from nodeB %d ms after nodeA's stop began: the handover should take about one second", ms)
	}
}

// TestStalledPrimaryResumesBehindRestartedPeer: nodeA's host stalls (a
// paused VM: link down, every process stopped); nodeB takes over and
// writes alone; nodeB's daemon is restarted (an upgrade), and comes back
// WAIT, waiting for nodeA (cluster.start_wait); then nodeA's host goes
// on, still holding the VIP. nodeB's copy is the newer one: nodeA must
// step down and nodeB serve it, with what it wrote alone. Before, nodeA
// stayed the reference (nodeB, hearing it serve, counted its copy stale)
// and its resync removed nodeB's writes (DESIGN §7, "A term its peer has
// known").
func TestStalledPrimaryResumesBehindRestartedPeer(t *testing.T) {
	l, hello := clusterLab(t, true)
	NewWorkload(l.AData, 5).Run(100)
	l.WaitSync(t, time.Minute)
	if out, err := l.run("stall", "a"); err != nil {
		t.Fatalf("stall a: %v\n%s", err, out)
	}
	resumed := false
	defer func() {
		if !resumed {
			l.run("resume", "a")
		}
	}()
	l.WaitState(t, "b", "ALONE", 30*time.Second)
	NewWorkload(l.BData, 6).Run(100) // (it renames and removes what it finds)
	const mine = "written by nodeB while nodeA was stalled\n"
	f, err := os.Create(filepath.Join(l.BData, "only-on-b"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(mine); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	// nodeB's daemon restarts: its term ended without a handover.
	l.Stop(t, "b")
	l.Start(t, "b")
	st := l.WaitState(t, "b", "WAIT", 30*time.Second)
	if st.Stale {
		t.Fatalf("nodeB restarted stale: the scenario needs its newer copy not stale (%+v)", st)
	}
	// nodeA's host goes on.
	if out, err := l.run("resume", "a"); err != nil {
		t.Fatalf("resume a: %v\n%s", err, out)
	}
	resumed = true
	l.WaitState(t, "a", "SECOND", time.Minute)
	l.WaitSync(t, time.Minute)
	sb := l.Status(t, "b")
	if sb.State != "PRIM" {
		t.Fatalf("nodeB is %s after nodeA resumed: want it serving its newer copy", sb.State)
	}
	for _, dir := range []string{l.BData, l.AData} {
		b, err := os.ReadFile(filepath.Join(dir, "only-on-b"))
		if err != nil || string(b) != mine {
			t.Fatalf("%s: what nodeB wrote alone is gone (%q, %v): the stalled primary's older copy replaced it", dir, b, err)
		}
	}
	if _, ans := l.connect(t, hello, time.Now()); ans != "hello from nodeB" {
		t.Fatalf("the client got %q through the VIP, want nodeB", ans)
	}
	l.Verify(t)
}
