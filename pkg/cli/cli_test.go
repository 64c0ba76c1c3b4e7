package cli

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/latency"
	"github.com/duet-ha/duet/pkg/node"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/sysmon"
)

func run(args ...string) (string, int) {
	var out bytes.Buffer
	code := Main(IOStreams{In: strings.NewReader(""), Out: &out, Err: &out}, args)
	return out.String(), code
}

func writeConfig(t *testing.T, mutate func(string) string) string {
	t.Helper()
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	os.Mkdir(data, 0o755)
	y := `node: nodeA
role: primary
listen: 127.0.0.1:0
peer: 127.0.0.2:1
key: "0123456789abcdef"
state_dir: ` + filepath.Join(dir, "state") + `
vip: {address: 10.250.0.100/24, interface: eth0}
replicate:
  - path: ` + data + "\n"
	if mutate != nil {
		y = mutate(y)
	}
	p := filepath.Join(dir, "duet.yaml")
	os.WriteFile(p, []byte(y), 0o644)
	return p
}

func TestVersion(t *testing.T) {
	out, code := run("version")
	if code != 0 || !strings.HasPrefix(out, "duet ") {
		t.Fatalf("exit %d: %s", code, out)
	}
}

func TestBadInputIsNamed(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"bad role flag", []string{"run", "--config", writeConfig(t, nil), "--role", "leader"}, `role "leader"`},
		{"bad output", []string{"status", "--socket", "/nonexistent.sock", "--output", "xml"}, `--output "xml"`},
		{"no daemon", []string{"status", "--socket", filepath.Join(t.TempDir(), "none.sock")}, "none.sock (start it: systemctl start duet, or duet run --config FILE; or name another with --socket or --config): dial unix"},
		{"unreachable peer", []string{"verify", "--config", writeConfig(t, nil), "--timeout", "5s"}, "asking 127.0.0.2:1"},
		{"unknown dir", []string{"verify", "--config", writeConfig(t, nil), "--dir", "nope"}, `--dir "nope"`},
		{"bad yaml", []string{"verify", "--config", writeConfig(t, func(s string) string { return s + "bogus: 1\n" })}, "line 10: bogus: unknown field"},
		{"stray argument", []string{"status", "extra"}, "unknown command"},
		{"resync without daemon", []string{"resync", "--socket", filepath.Join(t.TempDir(), "none.sock")}, "no duet daemon at"},
		{"nfs export missing", []string{"nfs-serve", "/nonexistent/export", "--listen", "127.0.0.1:0"}, "opening /nonexistent/export"},
		{"nfs bad listen", []string{"nfs-serve", t.TempDir(), "--listen", "nope"}, `--listen "nope"`},
		{"nfs bad client network", []string{"nfs-serve", t.TempDir(), "--listen", "127.0.0.1:0", "--allow", "10.0.0.0/40"}, `--allow: client network "10.0.0.0/40"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, code := run(tt.args...)
			if code != 2 || !strings.Contains(out, tt.want) {
				t.Fatalf("exit %d, output %q: want exit 2 and %q", code, out, tt.want)
			}
		})
	}
}

// A bad DUET_MONITOR_SLACK stops the daemon and duet exec before they
// start anything, and is named.
func TestBadMonitorSlackIsNamed(t *testing.T) {
	t.Setenv(sysmon.EnvSlack, "fast")
	want := sysmon.EnvSlack + `="fast": want a duration from 0 to 1s`
	for _, args := range [][]string{
		{"run", "--config", writeConfig(t, nil)},
		{"run", "--check", "--config", writeConfig(t, nil)},
		{"exec", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--", "true"},
	} {
		if out, code := run(args...); code != 2 || !strings.Contains(out, want) {
			t.Errorf("%v: exit %d, output %q: want exit 2 and %q", args, code, out, want)
		}
	}
}

// A missing configuration names the ways round it: the flags of the
// command, or the ways to write one.
func TestMissingConfigNamesTheFix(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "duet.yaml")
	const (
		withSocket = ": no such file or directory: name the configuration with --config PATH or the daemon's control socket with --socket PATH, or write one (duet init k3s, or from /usr/share/doc/duet/examples/duet.yaml)\n"
		configOnly = ": no such file or directory: name the configuration with --config PATH, or write one (duet init k3s, or from /usr/share/doc/duet/examples/duet.yaml)\n"
	)
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"status"}, withSocket},
		{[]string{"swap"}, withSocket},
		{[]string{"resync"}, withSocket},
		{[]string{"exec", "--", "true"}, withSocket},
		{[]string{"run", "--check"}, configOnly},
		{[]string{"verify"}, configOnly},
	} {
		t.Run(tc.args[0], func(t *testing.T) {
			args := append([]string{tc.args[0], "--config", missing}, tc.args[1:]...)
			out, code := run(args...)
			if want := "duet: config " + missing + tc.want; code != 2 || out != want {
				t.Fatalf("exit %d, output %q: want exit 2 and %q", code, out, want)
			}
		})
	}
}

// The example configuration in docs/examples/ must stay valid apart from paths
// that only exist on a real node.
func TestExampleConfigFields(t *testing.T) {
	out, code := run("verify", "--config", "../../docs/examples/duet.yaml")
	if code != 2 || !strings.Contains(out, `replicate[0].path "/srv/data"`) || strings.Contains(out, "unknown field") {
		t.Fatalf("exit %d: %s", code, out)
	}
}

// The k3s example names the missing module paths and password, nothing else.
func TestExampleK3SConfig(t *testing.T) {
	out, code := run("run", "--check", "--config", "../../testdata/duet-k3s.yaml")
	if code == 0 || !strings.Contains(out, `k3s.mysql_dir "/var/lib/duet-k3s/mysql"`) ||
		!strings.Contains(out, "k3s.password_file") || strings.Contains(out, "unknown field") {
		t.Fatalf("exit %d: %s", code, out)
	}
}

// duet run --check reports a cluster key that is missing, too short or
// readable by others, as the daemon would refuse it at start, and how to
// make one.
func TestRunCheckKey(t *testing.T) {
	dir := t.TempDir()
	loose := filepath.Join(dir, "key")
	os.WriteFile(loose, []byte("0123456789abcdef0123456789abcdef\n"), 0o600)
	os.Chmod(loose, 0o644)
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("secret\n"), 0o600)
	for _, tc := range []struct {
		name, key, want string
	}{
		{"short inline key", `key: "secret"`, "key: 6 bytes is too short: want at least 16"},
		{"key file readable by others", "key_file: " + loose, `key_file "` + loose + `": mode 0644 lets group or others read or write this secret: run chmod 600 ` + loose},
		{"key file missing", "key_file: " + filepath.Join(dir, "none"), `key_file "` + filepath.Join(dir, "none") + `": no such file or directory: ` +
			"create it with `head -c 32 /dev/urandom | base64 > " + filepath.Join(dir, "none") + "; chmod 600 " + filepath.Join(dir, "none") + "` and copy it to the other node, or let `duet init k3s` write one"},
		{"key file too short", "key_file: " + short, `key_file "` + short + `": key of 6 bytes is too short (want at least 16): write a new one with ` +
			"`head -c 32 /dev/urandom | base64 > " + short + "; chmod 600 " + short + "`"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeConfig(t, func(s string) string { return strings.Replace(s, `key: "0123456789abcdef"`, tc.key, 1) })
			out, code := run("run", "--check", "--config", cfg)
			if code != 2 || !strings.Contains(out, tc.want) {
				t.Fatalf("exit %d, output %q: want exit 2 and %q", code, out, tc.want)
			}
		})
	}
	if out, code := run("run", "--check", "--config", writeConfig(t, nil)); code != 0 || !strings.Contains(out, ": ok") {
		t.Fatalf("a good key: exit %d, output %q", code, out)
	}
}

func TestProgressLine(t *testing.T) {
	r := replica.ResyncStatus{Active: true, Mode: "bitmap", Phase: "sending", BytesPlanned: 100 << 20, BytesSent: 25 << 20,
		FilesCompared: 3, FilesTotal: 10, RateBps: 5 << 20, EtaSec: 15}
	got := progressLine("data", &r, true)
	for _, want := range []string{"[######..................]", " 25%", "25.0 MiB / 100.0 MiB", "3/10 files compared", "5.0 MiB/s", "ETA 15s", "(bitmap)"} {
		if !strings.Contains(got, want) {
			t.Errorf("progress %q lacks %q", got, want)
		}
	}
	// Copying to an empty peer: the bytes planned are what the walk read
	// so far, not a total, and the bar does not pretend otherwise.
	r = replica.ResyncStatus{Active: true, Mode: "full", Phase: "copying", BytesPlanned: 30 << 20, BytesSent: 25 << 20, FilesTotal: 5000, RateBps: 5 << 20}
	got = progressLine("data", &r, true)
	for _, want := range []string{"[........................]", "  0%", "25.0 MiB sent", "5000 files read so far", "5.0 MiB/s", "(full)"} {
		if !strings.Contains(got, want) {
			t.Errorf("copying: progress %q lacks %q", got, want)
		}
	}
	if got := progressLine("data", &replica.ResyncStatus{}, false); !strings.Contains(got, "waiting for the peer") {
		t.Errorf("idle, disconnected: %q", got)
	}
}

func TestPrintStatusResync(t *testing.T) {
	st := node.Status{Node: "nodeA", State: "PRIM", EventHook: "peer_lost nodeB: done (1 tries)",
		LostPeer: "nodeB confirmed down, peer_lost done: peer_back owed once it is a mirror again",
		Dirs: []replica.Status{{Dir: "data", Connected: true, BitmapBytes: 8192, BitmapFiles: 2, BitmapTrusted: true,
			Resync: replica.ResyncStatus{Active: true, Mode: "bitmap+recent", Phase: "sending", BytesPlanned: 10 << 20, BytesSent: 5 << 20}}},
		Copies: []node.CopyStatus{{Dir: "data", Gen: "00000000000000ff", Consistent: false, Crashed: true}}}
	var out bytes.Buffer
	if err := printStatus(&out, &st, "text"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"modification bitmap: 8.0 KiB in 2 files, trusted", "resync: data [############............]  50% sending",
		"copy data: generation 00000000000000ff, sync point none yet INCONSISTENT",
		"hook peer_lost nodeB: done (1 tries)\nlost peer nodeB confirmed down, peer_lost done: peer_back owed"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}

// TestPrintStatusFailedService: the node that gave the role up for a
// failed service, and the one that kept it with its own failed, each say
// so and what moves the role.
func TestPrintStatusFailedService(t *testing.T) {
	for _, c := range []struct {
		st   node.Status
		want string
	}{
		{node.Status{Node: "nodeA", State: "SECOND", ServiceFailed: true}, "does not come back on its own"},
		{node.Status{Node: "nodeB", State: "PRIM", ServiceDown: "mariadb: exited 1", PeerState: node.PeerStatus{Seen: true, Name: "nodeA", ServiceFailed: true}},
			"a service failed here (mariadb: exited 1) and this node kept the role: a service failed on the peer too"},
		{node.Status{Node: "nodeB", State: "ALONE", ServiceDown: "mariadb: exited 1"}, "kept the role: no peer in sync could take it"},
	} {
		var out bytes.Buffer
		if err := printStatus(&out, &c.st, "text"); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out.String(), c.want) {
			t.Errorf("status of %s lacks %q:\n%s", c.st.Node, c.want, out.String())
		}
	}
}

// near reports whether s, a number, is v or at most 10 % above it.
func near(s string, v float64) bool {
	x, err := strconv.ParseFloat(s, 64)
	return err == nil && x >= v && x <= 1.1*v
}

// TestPrintLatency: each stage's quantiles over what it counted since the
// earlier snapshot (the --watch form), in stage order.
func TestPrintLatency(t *testing.T) {
	var st latency.Stages
	for range 10 {
		st.Observe(latency.Drain, 40*time.Microsecond)
		st.Observe(latency.Peer, 900*time.Microsecond)
	}
	prev := st.Snapshot()
	for range 10 {
		st.Observe(latency.Peer, 3*time.Millisecond)
	}
	var all, since bytes.Buffer
	if err := printLatency(&all, st.Snapshot(), nil, "text"); err != nil {
		t.Fatal(err)
	}
	if err := printLatency(&since, st.Snapshot(), prev, "text"); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"drain     10", "peer     20"} {
		if !strings.Contains(strings.Join(strings.Fields(all.String()), " "), strings.Join(strings.Fields(want), " ")) {
			t.Errorf("since start: no %q in\n%s", want, all.String())
		}
	}
	fields := func(out, stage string) []string {
		for _, l := range strings.Split(out, "\n") {
			if f := strings.Fields(l); len(f) > 0 && f[0] == stage {
				return f
			}
		}
		return nil
	}
	if f := fields(since.String(), "peer"); len(f) != 5 || f[1] != "10" || !near(f[2], 3000) {
		t.Errorf("peer since the snapshot: %v, want 10 calls at p50 ≈ 3000 µs\n%s", f, since.String())
	}
	if f := fields(since.String(), "drain"); len(f) != 5 || f[1] != "0" {
		t.Errorf("drain since the snapshot: %v, want 0 calls\n%s", f, since.String())
	}
}

// TestResyncBars: a bar per directory with the daemon's figures beside
// it, complete at the end.
func TestResyncBars(t *testing.T) {
	var out bytes.Buffer
	b := newProgressBars(&out, 200)
	r := replica.ResyncStatus{Active: true, Phase: "sending", Mode: "bitmap", BytesPlanned: 1 << 20, BytesSent: 1 << 19, FilesCompared: 3, FilesTotal: 7, EtaSec: 2}
	frac, text := progressOf(&r, true)
	if frac != 0.5 {
		t.Errorf("half the planned bytes sent: fraction %v, want 0.5", frac)
	}
	b.set("data", frac, text)
	b.set("mysql", 0, "waiting for the peer")
	b.end(true)
	got := out.String()
	for _, want := range []string{"data", "mysql", "3/7 files compared", "ETA 2s", "waiting for the peer", "100 %"} {
		if !strings.Contains(got, want) {
			t.Errorf("bars lack %q:\n%s", want, got)
		}
	}
}

// The host checks depend on the machine (pkg/node tests them); here they
// find nothing wrong unless a test says otherwise.
func TestMain(m *testing.M) {
	preflight = func(*config.Config) ([]string, []error) { return []string{"replicate data: ext4"}, nil }
	os.Exit(m.Run())
}

// duet run --check prints what the host checks found under the
// configuration's verdict, and lists every problem they found at once.
func TestRunCheckHost(t *testing.T) {
	cfg := writeConfig(t, nil)
	if out, code := run("run", "--check", "--config", cfg); code != 0 || out != "config "+cfg+": ok\n  replicate data: ext4\n" {
		t.Fatalf("exit %d, output %q", code, out)
	}
	defer func(f func(*config.Config) ([]string, []error)) { preflight = f }(preflight)
	preflight = func(*config.Config) ([]string, []error) {
		return []string{"replicate data: ext4"}, []error{errors.New(`vip.interface: vip interface "eth9": Link not found`), errors.New(`metrics "127.0.0.1:9788": tcp port in use`)}
	}
	want := "config " + cfg + ": ok\n  replicate data: ext4\nduet: this host: 2 problems:\n" +
		"  vip.interface: vip interface \"eth9\": Link not found\n  metrics \"127.0.0.1:9788\": tcp port in use\n"
	if out, code := run("run", "--check", "--config", cfg); code != 2 || out != want {
		t.Fatalf("exit %d, output %q: want exit 2 and %q", code, out, want)
	}
}
