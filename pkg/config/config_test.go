package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func base(t *testing.T) string {
	cfg, _ := baseIn(t)
	return cfg
}

// baseIn is base's configuration and the directory it made (its data
// directory is dir/data).
func baseIn(t *testing.T) (cfg, dir string) {
	dir = t.TempDir()
	data := filepath.Join(dir, "data")
	os.Mkdir(data, 0o755)
	return `node: nodeA
role: primary
listen: 10.250.0.1:7788
peer: 10.250.0.2:7788
key: "0123456789abcdef"
state_dir: ` + filepath.Join(dir, "state") + `
vip: {address: 10.250.0.100/24, interface: eth0}
replicate:
  - path: ` + data + "\n", dir
}

func TestParseGood(t *testing.T) {
	c, err := Parse([]byte(base(t)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Replicate[0].Name != "data" || c.RingBufferKiB != DefaultRingKiB || !strings.HasSuffix(c.Socket, "duet.sock") {
		t.Fatalf("defaults not applied: %+v", c)
	}
	cl := c.Cluster
	if cl.Timeout != DefaultTimeout || cl.Interval != DefaultInterval || len(cl.Networks) != 1 ||
		cl.Networks[0] != (Network{Local: "10.250.0.1", Peer: "10.250.0.2"}) || c.Metrics != DefaultMetrics {
		t.Fatalf("cluster defaults not applied: %+v metrics %q", cl, c.Metrics)
	}
	if c.Hooks.PeerLostAfter != DefaultPeerLostAfter {
		t.Fatalf("hooks.peer_lost_after %s, want the default %s", c.Hooks.PeerLostAfter, DefaultPeerLostAfter)
	}
	if c.Replicate[0].Mode != ModeSync || cl.AloneWrites != AloneRelease {
		t.Fatalf("mode %q, alone_writes %q: want sync and release by default", c.Replicate[0].Mode, cl.AloneWrites)
	}
	a, err := Parse([]byte(strings.Replace(base(t), "  - path: ", "  - mode: async\n    path: ", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if a.Replicate[0].MaxLag != DefaultMaxLag {
		t.Fatalf("async max_lag %s, want the default %s", a.Replicate[0].MaxLag, DefaultMaxLag)
	}
}

func TestParseErrorsNameTheField(t *testing.T) {
	tests := []struct {
		name, from, to, want string
	}{
		{"role", "role: primary", "role: boss", `role "boss"`},
		{"listen", "listen: 10.250.0.1:7788", "listen: nowhere", `listen "nowhere"`},
		{"unknown field", "node: nodeA", "node: nodeA\nnodes: x", "line 2: nodes: unknown field (did you mean node?)"},
		{"missing key", `key: "0123456789abcdef"`, "", "key: set key or key_file"},
		{"node name", "node: nodeA", "node: 'a b'", `node "a b"`},
		{"ring", "node: nodeA", "node: nodeA\nring_buffer_kib: 3", "ring_buffer_kib 3"},
		{"mode", "  - path: ", "  - mode: lazy\n    path: ", `replicate[0].mode "lazy"`},
		{"max_lag on sync", "  - path: ", "  - max_lag: 1s\n    path: ", `replicate[0].max_lag 1s: only for mode "async"`},
		{"alone_writes", "node: nodeA", "node: nodeA\ncluster: {alone_writes: panic}", `cluster.alone_writes "panic"`},
		{"timeout", "node: nodeA", "node: nodeA\ncluster: {interval: 500ms, timeout: 1s}", "cluster.timeout 1s: must be at least 3 heartbeat intervals"},
		{"duration", "node: nodeA", "node: nodeA\ncluster: {timeout: soon}", `line 2: cluster.timeout: "soon" is not a duration (e.g. 200ms, 1.5s)`},
		{"witness", "node: nodeA", "node: nodeA\ncluster: {witness: gateway}", `cluster.witness "gateway"`},
		{"vip address", "address: 10.250.0.100/24", "address: 10.250.0.100", `vip.address "10.250.0.100"`},
		{"vip interface", ", interface: eth0", "", "vip.interface"},
		{"wildcard heartbeat address", "node: nodeA", "node: nodeA\ncluster: {networks: [{local: 0.0.0.0, peer: 10.250.0.2}]}", `cluster.networks[0].local "0.0.0.0": want this node's own address`},
		{"peer address also local", "node: nodeA", "node: nodeA\ncluster: {networks: [{local: 10.250.0.1, peer: 10.250.1.2}, {local: 10.250.1.2, peer: 10.250.1.1}]}", `cluster.networks[0].peer "10.250.1.2": also a local address of this node`},
		{"service start", "node: nodeA", "node: nodeA\nservices: [{name: web}]", "services[0].start"},
		{"service checks", "node: nodeA", "node: nodeA\nservices: [{name: web, start: x, check_tcp: ':80', check_command: y}]", "more than one of check_tcp, check_command and check_nfs"},
		{"service dup", "node: nodeA", "node: nodeA\nservices: [{name: web, start: x}, {name: web, start: y}]", `services[1].name "web": already used`},
		{"metrics", "node: nodeA", "node: nodeA\nmetrics: 9788", `metrics "9788"`},
		{"pprof without metrics", "node: nodeA", "node: nodeA\nmetrics: off\npprof: true", "pprof: true serves the profiles on the metrics address"},
		{"pprof not a bool", "node: nodeA", "node: nodeA\npprof: sometimes", "pprof"},
		{"prefer", "node: nodeA", "node: nodeA\ncluster: {prefer: 'node A'}", `cluster.prefer "node A"`},
		{"failback_delay", "node: nodeA", "node: nodeA\ncluster: {failback_delay: -1s}", "cluster.failback_delay -1s"},
		{"start_wait word", "node: nodeA", "node: nodeA\ncluster: {start_wait: never}", `cluster.start_wait "never": want "forever" or a duration`},
		{"start_wait negative", "node: nodeA", "node: nodeA\ncluster: {start_wait: -5m}", `cluster.start_wait "-5m"`},
		{"resync margin", "node: nodeA", "node: nodeA\nresync: {margin: -5s}", "resync.margin -5s"},
		{"resync rate", "node: nodeA", "node: nodeA\nresync: {rate_mib: -1}", "resync.rate_mib -1"},
		{"peer_lost_after short", "node: nodeA", "node: nodeA\nhooks: {peer_lost_after: 1s}", "hooks.peer_lost_after 1s: must be between cluster.timeout (1.2s) and 1h"},
		{"peer_lost_after long", "node: nodeA", "node: nodeA\nhooks: {peer_lost_after: 2h}", "hooks.peer_lost_after 2h0m0s: must be between"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			y := strings.Replace(base(t), tt.from, tt.to, 1)
			_, err := Parse([]byte(y))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want it to contain %q", err, tt.want)
			}
		})
	}
}

func TestReplicatePathChecks(t *testing.T) {
	y := base(t)
	file := filepath.Join(t.TempDir(), "f")
	os.WriteFile(file, nil, 0o644)
	for path, want := range map[string]string{
		"relative":        "must be an absolute path",
		"/does/not/exist": `"/does/not/exist": no such file or directory: create it on both nodes (mkdir -p /does/not/exist), or correct the path`,
		file:              "not a directory",
	} {
		yy := y[:strings.Index(y, "replicate:")] + "replicate:\n  - path: " + path + "\n"
		_, err := Parse([]byte(yy))
		if err == nil || !strings.Contains(err.Error(), "replicate[0].path") || !strings.Contains(err.Error(), want) {
			t.Errorf("path %q: error %v, want replicate[0].path ... %q", path, err, want)
		}
	}
}

func TestStateDirInsideReplicated(t *testing.T) {
	y := base(t)
	data := strings.TrimSpace(y[strings.Index(y, "- path: ")+8:])
	y = strings.Replace(y, "state_dir: ", "state_dir: "+data+"/.duet #", 1)
	_, err := Parse([]byte(y))
	if err == nil || !strings.Contains(err.Error(), "must not be inside") {
		t.Fatalf("error %v", err)
	}
}

// TestNothingStopsTwoPrimaries: without a VIP (whose ARP probe shows a
// live old primary) and without a fencing command, nothing stops both
// nodes serving after a split of the link between them: refused. A
// witness alone does not help (both nodes may reach it).
func TestNothingStopsTwoPrimaries(t *testing.T) {
	const vip = "vip: {address: 10.250.0.100/24, interface: eth0}\n"
	const want = "cluster: neither vip nor cluster.fence is set: nothing stops both nodes serving after a network split; set vip"
	for _, tc := range []struct {
		name, from, to string
		ok             bool
	}{
		{"vip", "", "", true},
		{"fence", vip, "cluster: {fence: 'ipmitool -H bmc-b chassis power off'}\n", true},
		{"vip and fence", vip, vip + "cluster: {fence: 'ipmitool -H bmc-b chassis power off'}\n", true},
		{"neither", vip, "", false},
		{"witness only", vip, "cluster: {witness: 10.250.0.254}\n", false},
		{"blank fence", vip, "cluster: {fence: '  '}\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			y := base(t)
			if tc.from != "" {
				if !strings.Contains(y, tc.from) {
					t.Fatalf("base config lacks %q", tc.from)
				}
				y = strings.Replace(y, tc.from, tc.to, 1)
			}
			_, err := Parse([]byte(y))
			switch {
			case tc.ok && err != nil:
				t.Fatalf("refused: %v", err)
			case !tc.ok && (err == nil || !strings.Contains(err.Error(), want)):
				t.Fatalf("error %v, want it to contain %q", err, want)
			}
		})
	}
}

// TestEpochID: the two nodes of a pair, each with its own file (the same
// addresses, local and peer swapped), get different numbers, whatever the
// order of their networks.
func TestEpochID(t *testing.T) {
	for _, tc := range []struct {
		name string
		a, b []Network // nodeA's networks; nodeB's are the same swapped, in b's order
	}{
		{"one network", []Network{{"10.250.0.1", "10.250.0.2"}}, []Network{{"10.250.0.2", "10.250.0.1"}}},
		{"higher address first", []Network{{"10.250.0.2", "10.250.0.1"}}, []Network{{"10.250.0.1", "10.250.0.2"}}},
		{"numeric, not textual order", []Network{{"10.250.0.9", "10.250.0.10"}}, []Network{{"10.250.0.10", "10.250.0.9"}}},
		{"two networks listed in other orders", []Network{{"10.250.0.1", "10.250.0.2"}, {"192.168.1.2", "192.168.1.1"}},
			[]Network{{"192.168.1.1", "192.168.1.2"}, {"10.250.0.2", "10.250.0.1"}}},
		{"IPv4 written as IPv6", []Network{{"::ffff:10.250.0.1", "10.250.0.2"}}, []Network{{"10.250.0.2", "10.250.0.1"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := Config{Cluster: Cluster{Networks: tc.a}}
			b := Config{Cluster: Cluster{Networks: tc.b}}
			ia, ib := a.EpochID(), b.EpochID()
			if ia == ib || ia < 1 || ia > 2 || ib < 1 || ib > 2 {
				t.Fatalf("nodeA %d, nodeB %d: want 1 and 2", ia, ib)
			}
		})
	}
}

// TestKeyChecks: a key anyone could guess, or a key file others can read
// or change, is refused when the configuration is loaded (duet run
// --check), with the file, its mode and the fix.
func TestKeyChecks(t *testing.T) {
	const inline = `key: "0123456789abcdef"`
	dir := t.TempDir()
	keyFile := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, mode); err != nil { // past the umask
			t.Fatal(err)
		}
		return "key_file: " + p
	}
	keyDir := filepath.Join(dir, "dir")
	if err := os.Mkdir(keyDir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, key, want string // want "": accepted
	}{
		{"inline key of 16 bytes", inline, ""},
		{"inline key too short", `key: "secret"`, "key: 6 bytes is too short: want at least 16"},
		{"key file 0600", keyFile("good", "0123456789abcdef\n", 0o600), ""},
		{"key file 0400", keyFile("readonly", "0123456789abcdef\n", 0o400), ""},
		{"key file too short", keyFile("short", "secret\n", 0o600), `key_file "` + filepath.Join(dir, "short") + `": key of 6 bytes is too short (want at least 16): ` +
			"write a new one with `head -c 32 /dev/urandom | base64 > " + filepath.Join(dir, "short") + "; chmod 600 " + filepath.Join(dir, "short") + "` and copy it to the other node"},
		{"key file readable by all", keyFile("world", "0123456789abcdef\n", 0o644),
			`key_file "` + filepath.Join(dir, "world") + `": mode 0644 lets group or others read or write this secret: run chmod 600 ` + filepath.Join(dir, "world")},
		{"key file readable by the group", keyFile("group", "0123456789abcdef\n", 0o640), "mode 0640 lets group or others"},
		{"key file writable by others", keyFile("others", "0123456789abcdef\n", 0o602), "mode 0602 lets group or others"},
		{"key file missing", "key_file: " + filepath.Join(dir, "none"), `key_file "` + filepath.Join(dir, "none") + `": no such file or directory: ` +
			"create it with `head -c 32 /dev/urandom | base64 > " + filepath.Join(dir, "none") + "; chmod 600 " + filepath.Join(dir, "none") + "` and copy it to the other node, or let `duet init k3s` write one"},
		{"key file unreadable", "key_file: " + keyDir, `key_file "` + keyDir + `": is a directory`},
		{"previous key", inline + "\nprevious_key: \"fedcba9876543210\"", ""},
		{"previous key file", inline + "\nprevious_" + keyFile("prev", "fedcba9876543210\n", 0o600), ""},
		{"previous key too short", inline + "\nprevious_key: \"old\"", "previous_key: 3 bytes is too short"},
		{"previous key file readable by all", inline + "\nprevious_" + keyFile("prevworld", "fedcba9876543210\n", 0o644),
			`previous_key_file "` + filepath.Join(dir, "prevworld") + `": mode 0644`},
		{"previous key the same", inline + "\nprevious_key: \"0123456789abcdef\"", "previous_key: the same as key: remove it"},
		{"both previous keys", inline + "\nprevious_key: \"fedcba9876543210\"\nprevious_key_file: /x", "previous_key and previous_key_file are both set"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			y := strings.Replace(base(t), inline, tc.key, 1)
			_, err := Parse([]byte(y))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

// TestDecodeProblems: what yaml.v3 says in Go terms (field x not found in
// type config.Cluster, cannot unmarshal !!str into time.Duration) reads
// as the key path, its line, the value and what is wanted. The base file
// has 9 lines: what is appended starts on line 10.
func TestDecodeProblems(t *testing.T) {
	for _, tc := range []struct {
		name, add, want, not string
	}{
		{"typo", "cluster:\n  heartbeat_prot: 7790\n", "line 11: cluster.heartbeat_prot: unknown field (did you mean heartbeat_port?)", ""},
		{"prefix", "cluster: {heartbeat: 7790}\n", "line 10: cluster.heartbeat: unknown field (did you mean heartbeat_port?)", ""},
		{"case", "vip2: x\ncluster: {Witness: 10.250.0.254}\n", "line 11: cluster.Witness: unknown field (did you mean witness?)", ""},
		{"nothing close", "colour: red\n", "line 10: colour: unknown field", "did you mean"},
		{"in a list", "services:\n  - name: web\n    start: x\n    chek_tcp: ':80'\n", "line 13: services[0].chek_tcp: unknown field (did you mean check_tcp?)", ""},
		{"duration", "cluster:\n  interval: fast\n", `line 11: cluster.interval: "fast" is not a duration (e.g. 200ms, 1.5s)`, ""},
		{"duration without unit", "hooks: {peer_lost_after: 60}\n", `line 10: hooks.peer_lost_after: "60" is not a duration (e.g. 200ms, 1.5s)`, ""},
		{"number", "ring_buffer_kib: big\n", `line 10: ring_buffer_kib: "big" is not a whole number`, ""},
		{"number in a list", "services:\n  - name: web\n    start: x\n    restarts: many\n", `line 13: services[0].restarts: "many" is not a whole number`, ""},
		{"bool", "insecure_plaintext_link: maybe\n", `line 10: insecure_plaintext_link: "maybe" is not true or false`, ""},
		{"list for a value", "metrics: [a, b]\n", "line 10: metrics: want a single value, not a list", ""},
		{"value for a list", "services: web\n", `line 10: services: "web" is not a list`, ""},
		{"value for a section", "cluster: fast\n", `line 10: cluster: "fast" is not a mapping (key: value lines)`, ""},
		{"list for a section", "resync:\n  - margin: 1s\n", "line 11: resync: want a mapping (key: value lines), not a list", ""},
		// yaml.v3 then decodes nothing of the file: no "node \"\"" either.
		{"set twice", "role: secondary\n", "line 10: role: set twice (first at line 2): keep one", `node ""`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(base(t) + tc.add))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to contain %q", err, tc.want)
			}
			if tc.not != "" && strings.Contains(err.Error(), tc.not) {
				t.Fatalf("error %v, want it without %q", err, tc.not)
			}
			if strings.Contains(err.Error(), "not found in type") || strings.Contains(err.Error(), "unmarshal") {
				t.Fatalf("error %v speaks Go", err)
			}
		})
	}
	if _, err := Parse([]byte("hello\n")); err == nil || err.Error() != `line 1: the file: "hello" is not a mapping (key: value lines)` {
		t.Fatalf("a file of one word: %v", err)
	}
}

// TestEveryProblemAtOnce: a file's decode problems do not hide its
// validation problems; all come in one error, one a line, by line, each
// with its line when the file sets the key. A key that did not decode is
// not validated again (its value is a default, not the file's).
func TestEveryProblemAtOnce(t *testing.T) {
	y := strings.Replace(base(t), "role: primary", "role: boss", 1) +
		"cluster:\n  interval: 1s\n  timeout: soon\n  heartbeat_prot: 7790\n  witness: gateway\nring_buffer_kib: 3\n"
	_, err := Parse([]byte(y))
	if err == nil {
		t.Fatal("accepted")
	}
	want := `5 problems:
  line 2: role "boss": must be "primary" or "secondary"
  line 12: cluster.timeout: "soon" is not a duration (e.g. 200ms, 1.5s)
  line 13: cluster.heartbeat_prot: unknown field (did you mean heartbeat_port?)
  line 14: cluster.witness "gateway": want an IP address (e.g. the default gateway)
  line 15: ring_buffer_kib 3: must be a power of two between 4 and 1048576`
	if err.Error() != want {
		t.Fatalf("error:\n%v\nwant:\n%s", err, want)
	}
	// Problems with keys the file does not set come last, without a line.
	_, err = Parse([]byte("node: nodeA\nrole: primary\ncolour: red\n"))
	if err == nil || !strings.HasPrefix(err.Error(), "8 problems:\n  line 3: colour: unknown field\n  listen \"\": want host:port") {
		t.Fatalf("error %v", err)
	}
}

func TestSuggest(t *testing.T) {
	cluster := []string{"heartbeat_port", "networks", "interval", "timeout", "witness", "fence", "alone_writes", "prefer", "failback_delay"}
	service := []string{"name", "start", "stop", "check_tcp", "check_command", "check_interval", "start_timeout", "stop_timeout", "check_nfs", "restarts"}
	top := []string{"node", "role", "listen", "peer", "key", "key_file", "vip", "state_dir", "socket"}
	for _, tc := range []struct {
		key   string
		names []string
		want  string
	}{
		{"heartbeat_prot", cluster, "heartbeat_port"}, // two neighbours swapped
		{"intervall", cluster, "interval"},
		{"HeartbeatPort", cluster, "heartbeat_port"},
		{"heartbeat-port", cluster, "heartbeat_port"},
		{"interval_ms", cluster, "interval"}, // a name is its prefix
		{"heartbeat", cluster, "heartbeat_port"},
		{"alone", cluster, "alone_writes"},
		{"check", service, ""}, // a prefix of several
		{"restart", service, "restarts"},
		{"nodes", top, "node"},
		{"kee", top, "key"},
		{"pere", top, "peer"},
		{"keyfile", top, "key_file"},
		{"vips", top, "vip"},
		{"rule", top, "role"},
		{"load", top, ""}, // two edits from node and role: too far for short names
		{"colour", top, ""},
		{"abz", []string{"ab_x", "ab_y"}, "ab_x or ab_y"},
	} {
		if got := suggest(tc.key, tc.names); got != tc.want {
			t.Errorf("suggest(%q) = %q, want %q", tc.key, got, tc.want)
		}
	}
}

// The example the package installs (/usr/share/doc/duet/examples) must
// keep parsing and validating as the fields change: the only problems it
// may have here are the key file and directories that exist only on a
// real node.
func TestShippedExample(t *testing.T) {
	const example = "../../docs/examples/duet.yaml"
	_, err := Load(example)
	if err == nil {
		return
	}
	onlyMissingFiles(t, example, err)
}

// So must the configuration the README shows (its first yaml block under
// "## Configuration"): a newcomer copies it.
func TestREADMEConfiguration(t *testing.T) {
	b, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sect, _ := strings.Cut(string(b), "\n## Configuration\n")
	_, block, ok := strings.Cut(sect, "```yaml\n")
	block, _, ok2 := strings.Cut(block, "```")
	if !ok || !ok2 || !strings.Contains(block, "heartbeat_port:") {
		t.Fatalf("no yaml block under the README's Configuration: %q", block)
	}
	if _, err := Parse([]byte(block)); err != nil {
		onlyMissingFiles(t, "README.md", err)
	}
}

func onlyMissingFiles(t *testing.T, example string, err error) {
	t.Helper()
	var ps problems
	if !errors.As(err, &ps) {
		t.Fatalf("%s: %v", example, err)
	}
	for _, p := range ps {
		if !strings.Contains(p.msg, "no such file or directory") {
			t.Errorf("%s: %s", example, p)
		}
	}
}

// The peer's addresses for the replication listener's kept handshake
// places: the host of peer and every network's peer address, IPv4
// written as IPv6 unmapped, each once; a host name keeps none.
func TestPeerAddrs(t *testing.T) {
	c := Config{Peer: "10.250.0.2:7788", Cluster: Cluster{Networks: []Network{{"10.250.0.1", "::ffff:10.250.0.2"}, {"192.168.1.1", "192.168.1.2"}}}}
	got := fmt.Sprint(c.PeerAddrs())
	if want := "[10.250.0.2 192.168.1.2]"; got != want {
		t.Errorf("PeerAddrs = %s, want %s", got, want)
	}
	c = Config{Peer: "nodeb.example:7788"}
	if got := c.PeerAddrs(); len(got) != 0 {
		t.Errorf("PeerAddrs of a host name = %v, want none", got)
	}
}

func TestStartWait(t *testing.T) {
	for _, tc := range []struct {
		yaml    string
		d       time.Duration
		forever bool
	}{
		{"", 0, true},
		{"\ncluster: {start_wait: forever}", 0, true},
		{"\ncluster: {start_wait: 10m}", 10 * time.Minute, false},
		{"\ncluster: {start_wait: 0s}", 0, false},
	} {
		c, err := Parse([]byte(strings.Replace(base(t), "node: nodeA", "node: nodeA"+tc.yaml, 1)))
		if err != nil {
			t.Fatalf("%q: %v", tc.yaml, err)
		}
		if d, forever := c.Cluster.StartWaitFor(); d != tc.d || forever != tc.forever {
			t.Errorf("%q: StartWaitFor %s, %v; want %s, %v", tc.yaml, d, forever, tc.d, tc.forever)
		}
	}
}
