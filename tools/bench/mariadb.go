package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/config"
)

// The MariaDB figure: sysbench oltp_write_only against the same MariaDB
// on nodeA's ext4, standalone (its data directory outside the replicated
// tree) and under duet sync (inside it) twice: as a service of nodeA's
// daemon, supervised in the daemon as the k3s module runs it, and under
// `duet exec` (a separate supervisor asking the daemon over its control
// socket), with the flags the module uses; the client in the client
// namespace, so all go through the same network.

const sbPassword = "bench-sb-password"

type mariadb struct {
	name, dir string
	port      int
	cmd       *exec.Cmd
	// service: run by nodeA's daemon (services:), not by the bench.
	service bool
}

func (b *bench) mariadbFigures(runs int) []Figure {
	for _, tool := range []string{"mariadbd", "mariadb-install-db", "mariadb", "sysbench"} {
		if _, err := exec.LookPath(tool); err != nil {
			fail(tool + " not installed (apt-get install mariadb-server sysbench)")
		}
	}
	secs, size := "20", "20000"
	if b.quick {
		secs, size = "4", "2000"
	}
	local := &mariadb{name: "standalone", dir: filepath.Join(b.lab, "a/mysql-local"), port: 3306}
	dup := &mariadb{name: "duet", dir: filepath.Join(b.lab, "a/data/mysql"), port: 3307}
	svc := &mariadb{name: "duet-service", dir: filepath.Join(b.lab, "a/data/mysql-svc"), port: 3308, service: true}
	// The service first: it restarts both daemons, which a server under
	// duet exec would not outlive (its calls fail with EIO meanwhile).
	restore := b.startMariaDBService(svc)
	b.sysbench(svc, "prepare", secs, size, 4)
	for _, m := range []*mariadb{local, dup} {
		b.startMariaDB(m)
		b.sysbench(m, "prepare", secs, size, 4)
	}
	defer func() {
		for _, m := range []*mariadb{local, dup} {
			m.stop()
		}
		restore()
	}()
	extra := ""
	if e := os.Getenv("DUET_BENCH_MARIADB_ARGS"); e != "" {
		extra = ", with " + e
	}
	var figs []Figure
	threadCounts := []int{4, 16}
	if b.quick {
		threadCounts = threadCounts[:1] // a check of the tooling
	}
	for _, threads := range threadCounts {
		tps := Figure{Name: fmt.Sprintf("MariaDB sysbench oltp_write_only (%d threads, %s s%s): TPS under duet exec, sync / standalone", threads, secs, extra),
			Target: "≥ 0.6", Unit: "transactions/s",
			Note: "innodb_flush_log_at_trx_commit=1, innodb_flush_method=fsync, the binlog synced at every commit: the k3s module's flags (docs/DESIGN.md §9); under duet exec, which asks nodeA's daemon over its control socket; order alternating, the other servers stopped (SIGSTOP) meanwhile"}
		p95 := Figure{Name: "same, p95 transaction latency, duet sync / standalone", Target: "≤ 2.0", Unit: "ms"}
		stps := Figure{Name: fmt.Sprintf("MariaDB sysbench oltp_write_only (%d threads, %s s%s): TPS as nodeA's service under duet sync / standalone", threads, secs, extra),
			Target: "≥ 0.6", Unit: "transactions/s",
			Note: "the same server and flags, started by nodeA's daemon (services:, as the k3s module runs it): its durability calls are held by the daemon's own supervisor, with no duet exec process and no control socket between"}
		sp95 := Figure{Name: "same, p95 transaction latency, as nodeA's service / standalone", Target: "≤ 2.0", Unit: "ms"}
		var perTx, svcPerTx []string
		// One server runs at a time: the others are stopped (SIGSTOP),
		// whose page cleaners' writes, and duet's replication of them,
		// would run beside the one measured.
		others := func(m *mariadb) func() {
			var resume []func()
			for _, o := range []*mariadb{local, dup, svc} {
				if o != m {
					resume = append(resume, b.paused(o))
				}
			}
			return func() {
				for _, r := range resume {
					r()
				}
			}
		}
		underDuet := func(m *mariadb, workload string, calls *[]string) (float64, float64) {
			defer others(m)()
			var t, p float64
			b.timed(workload, func() {
				before := b.barriers() // after timed's settle: its calls are not sysbench's
				t, p = b.sysbench(m, "run", secs, size, threads)
				n, _ := strconv.ParseFloat(secs, 64)
				*calls = append(*calls, fmt.Sprintf("%.2f", float64(b.barriers()-before)/(t*n)))
			})
			return t, p
		}
		for i := 0; i < runs; i++ {
			var lt, lp, dt, dp, st, sp float64
			pair(i, func() {
				defer others(local)()
				settle() // as timed does for duet's runs
				lt, lp = b.sysbench(local, "run", secs, size, threads)
			}, func() {
				// The two supervisors alternate too, apart from the
				// baseline's order (pair): over four runs each comes
				// next to the baseline twice.
				first, second := dup, svc
				if (i/2)%2 == 1 {
					first, second = svc, dup
				}
				for _, m := range []*mariadb{first, second} {
					if m == dup {
						dt, dp = underDuet(dup, fmt.Sprintf("MariaDB oltp_write_only, %d threads", threads), &perTx)
					} else {
						st, sp = underDuet(svc, fmt.Sprintf("MariaDB oltp_write_only as nodeA's service, %d threads", threads), &svcPerTx)
					}
				}
			})
			tps.add(lt, dt)
			p95.add(lp, dp)
			stps.add(lt, st)
			sp95.add(lp, sp)
		}
		tps.Note += "; durability calls duet waited on per transaction, per run: " + strings.Join(perTx, ", ")
		stps.Note += "; durability calls per transaction, per run: " + strings.Join(svcPerTx, ", ")
		for _, f := range []*Figure{&tps, &stps} {
			f.Met = median(f.Ratio) >= 0.6
		}
		for _, f := range []*Figure{&p95, &sp95} {
			f.Met = median(f.Ratio) <= 2.0
		}
		figs = append(figs, tps, p95, stps, sp95)
	}
	return figs
}

// startMariaDBService makes m a service of nodeA's daemon (and of nodeB's,
// on its copy of the directory, which it never starts: nodeA stays the
// primary), restarts both daemons with it and waits until it answers. The
// function it returns takes the service out again: the daemons restarted
// with their configurations as they were.
func (b *bench) startMariaDBService(m *mariadb) func() {
	m.initialise()
	saved := map[string][]byte{}
	b.must("stop", "b")
	b.must("stop", "a")
	for _, h := range []string{"a", "b"} {
		name := filepath.Join(b.lab, h+".yaml")
		raw, err := os.ReadFile(name)
		if err != nil {
			fail(err.Error())
		}
		saved[name] = raw
		if bytes.Contains(raw, []byte("\nservices:")) || bytes.HasPrefix(raw, []byte("services:")) {
			fail(name + " has services already: the MariaDB figure adds its own (run it before the failover figure)")
		}
		dir := strings.Replace(m.dir, filepath.Join(b.lab, "a"), filepath.Join(b.lab, h), 1)
		// Checked at its start only (the start-up check polls on its
		// own): while another server is measured this one is stopped
		// (SIGSTOP), and each periodic check's connection would wait in
		// its accept queue; a full queue fails the check, and the
		// daemon restarts the service, then fails over.
		svc := fmt.Sprintf("services:\n  - name: mariadb\n    start: exec %s\n    check_tcp: 127.0.0.1:%d\n    check_interval: 24h\n    start_timeout: 120s\n",
			strings.Join(b.mariadbArgs(&mariadb{name: m.name, dir: dir, port: m.port}), " "), m.port)
		if err := os.WriteFile(name, append(raw, svc...), 0o644); err != nil {
			fail(err.Error())
		}
	}
	b.must("start", "b")
	b.must("start", "a")
	b.waitState("a", "PRIM")
	b.waitSync()
	m.waitAnswers(b)
	return func() {
		b.must("stop", "b")
		b.must("stop", "a")
		for name, raw := range saved {
			if err := os.WriteFile(name, raw, 0o644); err != nil {
				fail(err.Error())
			}
		}
		b.must("start", "b")
		b.must("start", "a")
		b.waitState("a", "PRIM")
		b.waitSync()
	}
}

// paused stops m's server (SIGSTOP) until the function it returns is
// called.
func (b *bench) paused(m *mariadb) func() {
	pidFile := filepath.Join(b.lab, fmt.Sprintf("mysqld-%d.pid", m.port))
	raw, err := os.ReadFile(pidFile)
	pid, err2 := strconv.Atoi(strings.TrimSpace(string(raw)))
	if err != nil || err2 != nil || pid <= 1 {
		fail(fmt.Sprintf("MariaDB (%s): no pid in %s: %v %v", m.name, pidFile, err, err2))
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		fail(fmt.Sprintf("stopping MariaDB (%s, pid %d): %v", m.name, pid, err))
	}
	return func() { syscall.Kill(pid, syscall.SIGCONT) }
}

// barriers is how many durability calls nodeA's directories waited on
// since the daemon started.
func (b *bench) barriers() uint64 {
	var n uint64
	for _, d := range b.status().Dirs {
		n += d.Barriers
	}
	return n
}

func (b *bench) startMariaDB(m *mariadb) {
	m.initialise()
	args := b.mariadbArgs(m)
	if m.name == "duet" {
		args = append([]string{b.bin, "exec", "--config", filepath.Join(b.lab, "a.yaml"), "--"}, args...)
	}
	m.cmd = exec.Command(b.script, append([]string{"exec", "a"}, args...)...)
	m.cmd.Env = append(os.Environ(), "DUET_LAB="+b.lab, "DUET_BIN="+b.bin)
	logf, _ := os.Create(filepath.Join(b.lab, "mariadb-"+m.name+".log"))
	m.cmd.Stdout, m.cmd.Stderr = logf, logf
	if err := m.cmd.Start(); err != nil {
		fail(err.Error())
	}
	m.waitAnswers(b)
}

// initialise makes m's data directory: the system tables, the sbtest
// database and its user.
func (m *mariadb) initialise() {
	if err := os.MkdirAll(m.dir, 0o755); err != nil {
		fail(err.Error())
	}
	if out, err := exec.Command("mariadb-install-db", "--no-defaults", "--datadir="+m.dir, "--user=root",
		"--auth-root-authentication-method=socket", "--skip-test-db", "--innodb-log-file-size=48M").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("mariadb-install-db %s: %v\n%s", m.dir, err, out))
	}
	boot := exec.Command("mariadbd", "--no-defaults", "--datadir="+m.dir, "--user=root", "--bootstrap", "--skip-networking", "--innodb-log-file-size=48M")
	boot.Stdin = strings.NewReader("FLUSH PRIVILEGES;\nCREATE DATABASE sbtest;\nCREATE USER 'sb'@'%' IDENTIFIED BY '" + sbPassword + "';\nGRANT ALL PRIVILEGES ON sbtest.* TO 'sb'@'%';\n")
	if out, err := boot.CombinedOutput(); err != nil {
		fail(fmt.Sprintf("mariadbd --bootstrap %s: %v\n%s", m.dir, err, out))
	}
}

// mariadbArgs is m's server command line, with the k3s module's flags.
func (b *bench) mariadbArgs(m *mariadb) []string {
	args := []string{"mariadbd", "--no-defaults", "--datadir=" + m.dir, "--user=root",
		"--socket=" + filepath.Join(b.lab, fmt.Sprintf("mysqld-%d.sock", m.port)), "--pid-file=" + filepath.Join(b.lab, fmt.Sprintf("mysqld-%d.pid", m.port)),
		"--bind-address=0.0.0.0", fmt.Sprintf("--port=%d", m.port), "--skip-name-resolve",
		"--innodb-flush-log-at-trx-commit=1", "--innodb-flush-method=fsync", "--innodb-doublewrite=1",
		"--log-bin=binlog", "--sync-binlog=1", "--binlog-expire-logs-seconds=3600", "--max-binlog-size=16M",
		"--innodb-log-file-size=48M"}
	// Settings to compare (every server gets them; later flags win):
	// DUET_BENCH_MARIADB_ARGS="--innodb-flush-method=O_DIRECT".
	return append(args, strings.Fields(os.Getenv("DUET_BENCH_MARIADB_ARGS"))...)
}

// waitAnswers waits until m answers a query from the client namespace.
func (m *mariadb) waitAnswers(b *bench) {
	for i := 0; ; i++ {
		out, err := exec.Command("ip", "netns", "exec", "duet-c", "mariadb", "--no-defaults", "-h", "10.250.0.1",
			"-P", strconv.Itoa(m.port), "-u", "sb", "-p"+sbPassword, "-N", "-e", "SELECT 1", "sbtest").CombinedOutput()
		if err == nil {
			return
		}
		if i == 300 {
			log, _ := os.ReadFile(filepath.Join(b.lab, "mariadb-"+m.name+".log"))
			if m.service {
				log, _ = os.ReadFile(filepath.Join(b.lab, "a.log"))
			}
			fail(fmt.Sprintf("MariaDB (%s) does not answer after 30 s: %v %s\n%s", m.name, err, out, tail(string(log), 2000)))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (m *mariadb) stop() {
	if m.cmd == nil || m.cmd.Process == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		m.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		m.cmd.Process.Kill()
	}
}

var (
	sbTPS = regexp.MustCompile(`transactions:\s+\d+\s+\(([0-9.]+) per sec\.\)`)
	sbP95 = regexp.MustCompile(`95th percentile:\s+([0-9.]+)`)
)

// sysbench runs one sysbench step from the client namespace; for "run"
// it returns transactions per second and the p95 latency in ms.
func (b *bench) sysbench(m *mariadb, step, secs, size string, threads int) (float64, float64) {
	out, err := exec.Command("ip", "netns", "exec", "duet-c", "sysbench", "oltp_write_only", "--db-driver=mysql",
		"--mysql-host=10.250.0.1", "--mysql-port="+strconv.Itoa(m.port), "--mysql-user=sb", "--mysql-password="+sbPassword,
		"--mysql-db=sbtest", "--tables=2", "--table-size="+size, "--threads="+strconv.Itoa(threads), "--time="+secs, "--percentile=95", step).CombinedOutput()
	if err != nil {
		fail(fmt.Sprintf("sysbench %s (%s): %v\n%s", step, m.name, err, tail(string(out), 2000)))
	}
	if step != "run" {
		return 0, 0
	}
	t, p := sbTPS.FindStringSubmatch(string(out)), sbP95.FindStringSubmatch(string(out))
	if t == nil || p == nil {
		fail("sysbench output without TPS or p95:\n" + string(out))
	}
	tps, _ := strconv.ParseFloat(t[1], 64)
	lat, _ := strconv.ParseFloat(p[1], 64)
	return tps, lat
}

// failoverFigure kills the primary host (every process, link down) again
// and again with the hello service behind the VIP, and measures the time
// from the kill until the client gets an answer through the VIP.
func (b *bench) failoverFigure(runs int) Figure {
	hello := filepath.Join(b.lab, "hello")
	if out, err := exec.Command("go", "build", "-o", hello, "./tools/hello").CombinedOutput(); err != nil {
		fail(fmt.Sprintf("building tools/hello: %v\n%s", err, out))
	}
	b.must("stop", "b")
	b.must("stop", "a")
	for _, h := range []string{"a", "b"} {
		f, err := os.OpenFile(filepath.Join(b.lab, h+".yaml"), os.O_APPEND|os.O_WRONLY, 0)
		if err != nil {
			fail(err.Error())
		}
		fmt.Fprintf(f, "services:\n  - name: hello\n    start: %s serve -listen 0.0.0.0:8080 -name node%s\n    check_tcp: 127.0.0.1:8080\n    check_interval: 500ms\n",
			hello, strings.ToUpper(h))
		f.Close()
	}
	b.must("start", "b")
	b.must("start", "a")
	b.waitState("a", "PRIM")
	b.waitState("b", "SECOND")
	// Every figure before this one ran with both nodes up: a peer
	// declared lost during them (both CPUs busy) was a false alarm, and
	// a takeover that followed one a false takeover.
	lost, takeovers := b.peerLostCount()
	f := Figure{Name: fmt.Sprintf("failover: kill of the primary host → the service answers through the VIP (%d runs), over 1.5 s", runs),
		Target: "≤ 1.0 (median), max ≤ 2.0 s", Unit: "ms",
		Note: fmt.Sprintf("SIGKILL of every process on the host and its link down, the client asking from before the kill; %s heartbeat timeout (default), "+
			"takeover checks, VIP + gratuitous ARP, service start and check; baseline is the 1.5 s target. "+
			"During the figures before this one (both CPUs busy, nodeB stopped and started by some): peer declared lost %d times (those stops included), %d takeovers (must be 0)",
			config.DefaultTimeout, lost, takeovers)}
	p := "a"
	var times []float64
	for i := 0; i < runs; i++ {
		s := map[string]string{"a": "b", "b": "a"}[p]
		// The client polls before the kill (the old primary's answers
		// are not the one it waits for): lab.sh crash returns only once
		// the host's daemon is gone, which takes up to 2 s (its capture
		// links are torn down), and a client started after it measured
		// that wait too.
		t0 := time.Now().Add(300 * time.Millisecond)
		outc := make(chan string, 1)
		go func() {
			out, err := b.sh("exec", "c", hello, "connect", "-addr", "10.250.0.100:8080", "-want", "node"+strings.ToUpper(s),
				"-since", strconv.FormatInt(t0.UnixNano(), 10), "-timeout", "30s")
			if err != nil {
				out = fmt.Sprintf("%v: %s", err, out)
			}
			outc <- out
		}()
		time.Sleep(time.Until(t0))
		b.must("crash", p)
		out := <-outc
		fields := strings.Fields(out)
		ms, err := strconv.ParseFloat(fields[0], 64)
		if err != nil || len(fields) < 4 || fields[3] != "node"+strings.ToUpper(s) {
			fail("failover client: " + out)
		}
		times = append(times, ms)
		f.add(1500, ms)
		b.waitState(s, "ALONE")
		b.must("revive", p)
		b.must("start", p)
		b.waitState(p, "SECOND")
		p = s
	}
	if p != "a" { // the figures that follow write on nodeA
		b.must("duet", p, "swap")
		b.waitState("a", "PRIM")
	}
	sort.Float64s(times)
	f.Met = median(times) <= 1500 && times[len(times)-1] <= 2000 && takeovers == 0
	return f
}

// peerLostCount counts, in both daemons' logs so far, the times a node
// declared its peer lost and the takeovers (a node becoming ALONE after
// its checks) that followed.
func (b *bench) peerLostCount() (lost, takeovers int) {
	for _, h := range []string{"a", "b"} {
		log, err := os.ReadFile(filepath.Join(b.lab, h+".log"))
		if err != nil {
			fail(err.Error())
		}
		lost += bytes.Count(log, []byte("peer lost: no heartbeat"))
		takeovers += bytes.Count(log, []byte("peer lost, checks passed"))
	}
	return lost, takeovers
}
