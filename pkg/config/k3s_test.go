package config

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// k3sBase is a k3s-module config whose directories and password exist.
func k3sBase(t *testing.T) (string, string) {
	dir := t.TempDir()
	for _, d := range []string{"mysql", "nfs", "nfs-state"} {
		os.MkdirAll(filepath.Join(dir, "k3s", d), 0o755)
	}
	pw := filepath.Join(dir, "pw")
	os.WriteFile(pw, []byte("Abcdef0123456789\n"), 0o600)
	return `node: nodeA
role: primary
listen: 10.250.0.1:7788
peer: 10.250.0.2:7788
key: "0123456789abcdef"
state_dir: ` + filepath.Join(dir, "state") + `
vip: {address: 10.250.0.100/24, interface: eth0}
module: k3s
k3s:
  data_dir: ` + filepath.Join(dir, "k3s") + `
  password_file: ` + pw + "\n", dir
}

func TestK3SModuleExpands(t *testing.T) {
	y, dir := k3sBase(t)
	c, err := Parse([]byte(y + "  kine: 0.0.0.0:2379\n"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, r := range c.Replicate {
		names = append(names, r.Name+"="+strings.TrimPrefix(r.Path, dir))
	}
	if got := strings.Join(names, " "); got != "mysql=/k3s/mysql nfs=/k3s/nfs" {
		t.Fatalf("replicated: %s", got)
	}
	var svcs []string
	for _, s := range c.Services {
		svcs = append(svcs, s.Name)
	}
	if got := strings.Join(svcs, " "); got != "mariadb nfs kine" {
		t.Fatalf("services in order: %s", got)
	}
	maria := c.Services[0].Start
	for _, want := range []string{"--innodb-flush-log-at-trx-commit=1", "--innodb-flush-method=fsync", "--sync-binlog=1",
		"--datadir=" + filepath.Join(dir, "k3s", "mysql"), "--user=mysql", "--port=3306", "mariadb-install-db"} {
		if !strings.Contains(maria, want) {
			t.Errorf("mariadb start lacks %q:\n%s", want, maria)
		}
	}
	if !strings.Contains(c.Services[0].CheckCommand, "SELECT 1") || c.Services[1].CheckNFS != "127.0.0.1:2049" ||
		!strings.Contains(c.Services[2].CheckCommand, "get --limit 1") {
		t.Errorf("checks: %q %q %q", c.Services[0].CheckCommand, c.Services[1].CheckNFS, c.Services[2].CheckCommand)
	}
	self, _ := os.Executable()
	nfsDir := filepath.Join(dir, "k3s", "nfs")
	if want := `if [ "$(stat -c %u ` + nfsDir + `)" = 0 ]; then chown 65534:65534 ` + nfsDir + `; fi && exec ` + self + " nfs-serve " + nfsDir + " --listen 0.0.0.0:2049 --allow 10.250.0.0/24"; c.Services[1].Start != want || len(c.Files) != 0 {
		t.Fatalf("duet's NFS server: %q (files %+v), want %q and no file", c.Services[1].Start, c.Files, want)
	}
	c, err = Parse([]byte(y + "  nfs_server: ganesha\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Replicate) != 3 || c.Replicate[2].Name != "nfs-state" || !strings.Contains(c.Services[1].Start, "ganesha.nfsd -F -f") {
		t.Fatalf("ganesha: replicated %+v, start %q", c.Replicate, c.Services[1].Start)
	}
	if len(c.Files) != 1 || !strings.Contains(c.Files[0].Content, "Path = \""+filepath.Join(dir, "k3s", "nfs")+"\"") ||
		!strings.Contains(c.Files[0].Content, "Graceless = true") || !strings.Contains(c.Files[0].Content, "Protocols = 4") {
		t.Fatalf("ganesha config: %+v", c.Files)
	}
	if !strings.Contains(c.Hooks.PeerLost, `k3s kubectl taint nodes "$(printf %s "$DUET_PEER" | tr '[:upper:]' '[:lower:]')" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute`) ||
		!strings.Contains(c.Hooks.PeerBack, "node.kubernetes.io/out-of-service-") {
		t.Fatalf("hooks: %+v", c.Hooks)
	}

	// Overrides: a grace period, no kubectl, a user directory and service
	// after the module's.
	extra := filepath.Join(dir, "extra")
	os.Mkdir(extra, 0o755)
	c, err = Parse([]byte(y + "  nfs_server: ganesha\n  nfs_grace: 30s\n  kubectl: \"off\"\nreplicate:\n  - path: " + extra +
		"\nservices:\n  - name: web\n    start: sleep 1000\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Replicate) != 4 || c.Replicate[3].Name != "extra" || len(c.Services) != 3 || c.Services[2].Name != "web" {
		t.Fatalf("user's directories and services must follow the module's: %+v %+v", c.Replicate, c.Services)
	}
	if !strings.Contains(c.Files[0].Content, "Grace_Period = 30;") || c.Hooks.PeerLost != "" || c.Hooks.PeerLostCheck != "" {
		t.Fatalf("overrides ignored: %s %+v", c.Files[0].Content, c.Hooks)
	}
}

// TestK3SNFSGrace: the grace period must be one ganesha accepts
// (NFSV4.Grace_Period 0-180 s); beyond it ganesha refuses its
// configuration and the NFS service could start on no takeover.
func TestK3SNFSGrace(t *testing.T) {
	y, _ := k3sBase(t)
	for _, tc := range []struct{ grace, want string }{
		{"0s", "Graceless = true;"},
		{"5s", "Grace_Period = 5;"},
		{"90s", "Grace_Period = 90;"},
		{"3m", "Grace_Period = 180;"},
		{"2s", "k3s.nfs_grace 2s: 0 (no grace period) or between 5s and 180s (the most nfs-ganesha accepts)"},
		{"181s", "k3s.nfs_grace 3m1s: 0 (no grace period) or between 5s and 180s"},
		{"10m", "k3s.nfs_grace 10m0s: 0 (no grace period) or between 5s and 180s"},
		{"-1s", "k3s.nfs_grace -1s: 0 (no grace period) or between 5s and 180s"},
	} {
		c, err := Parse([]byte(y + "  nfs_server: ganesha\n  nfs_grace: " + tc.grace + "\n"))
		if strings.HasPrefix(tc.want, "k3s.") {
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("nfs_grace %s: got %v, want the error %q", tc.grace, err, tc.want)
			}
			continue
		}
		if err != nil {
			t.Errorf("nfs_grace %s: %v", tc.grace, err)
			continue
		}
		if !strings.Contains(c.Files[0].Content, tc.want) {
			t.Errorf("nfs_grace %s: ganesha config lacks %q:\n%s", tc.grace, tc.want, c.Files[0].Content)
		}
	}
}

func TestK3SModuleErrors(t *testing.T) {
	y, dir := k3sBase(t)
	for _, tc := range []struct{ edit, want string }{
		{"module: k8s", `module "k8s": the only module is "k3s"`},
		{"module: \"\"", "k3s: this section configures the k3s module: add `module: k3s`"},
		{"  password_file: /nonexistent/pw", `k3s.password_file "/nonexistent/pw": no such file or directory (` + "`duet init k3s` writes one"},
		{"  data_dir: " + filepath.Join(dir, "nowhere"), "k3s.mysql_dir \"" + filepath.Join(dir, "nowhere", "mysql") + "\": no such file or directory (`duet init k3s` creates it"},
		{"  database: \"kine; DROP\"", `k3s.database "kine; DROP": 1-32 letters`},
		{"  kine: nowhere", `k3s.kine "nowhere": want host:port`},
		{"  nfs_pseudo: \"/ex port\"", `k3s.nfs_pseudo "/ex port"`},
		{"  nfs_server: ganesha\n  nfs_dir: '/srv/a\"b'", `k3s.nfs_dir "/srv/a\"b": the NFS server's configuration cannot hold a path with a double quote`},
		{"  nfs_server: knfsd", `k3s.nfs_server "knfsd": "duet" (NFSv3, handles that survive failover) or "ganesha"`},
		{"  nfs_grace: 30s", `k3s.nfs_grace 30s: only for nfs_server: ganesha`},
		{"  nfs_clients: [10.0.0.0/99]", `k3s.nfs_clients "10.0.0.0/99": want a CIDR`},
		{"  nfs_clients: [any, 10.0.0.0/8]", `k3s.nfs_clients: "any" with other networks`},
		{"services:\n  - name: nfs\n    start: x", `services[0].name "nfs": already used by the k3s module's service`},
		{"services:\n  - name: web\n    start: x\n  - name: web\n    start: y", `services[1].name "web": already used by services[0]`},
		{"replicate:\n  - name: mysql\n    path: /tmp", `replicate[0].name "mysql": already used by k3s.mysql_dir`},
	} {
		var in string
		switch {
		case strings.HasPrefix(tc.edit, "module:"):
			in = strings.Replace(y, "module: k3s", tc.edit, 1)
		case strings.HasPrefix(tc.edit, "  password_file:"):
			in = regexp.MustCompile(`(?m)^  password_file: .*$`).ReplaceAllString(y, tc.edit)
		case strings.HasPrefix(tc.edit, "  data_dir:"):
			in = regexp.MustCompile(`(?m)^  data_dir: .*$`).ReplaceAllString(y, tc.edit)
		default:
			in = y + tc.edit + "\n"
		}
		_, err := Parse([]byte(in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got %v, want %q", tc.edit, err, tc.want)
		}
	}
	// A password with a quote would break the SQL: refused.
	os.WriteFile(filepath.Join(dir, "pw"), []byte("abc'defghijklmnop"), 0o600)
	if _, err := Parse([]byte(y)); err == nil || !strings.Contains(err.Error(), "12-128 letters") {
		t.Errorf("password with a quote: %v", err)
	}
}

// The module's peer_lost_check confirms a peer down only when Kubernetes
// answers that its node is NotReady (False or Unknown); a node it sees
// Ready, or an API that does not answer, confirms nothing.
func TestK3SPeerLostCheck(t *testing.T) {
	y, dir := k3sBase(t)
	kubectl := filepath.Join(dir, "kubectl")
	c, err := Parse([]byte(y + "  kubectl: " + kubectl + "\n  peer_kube_node: node-a\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, kubectl string
		down          bool
	}{
		{"NotReady", `[ "$*" = "get node node-a -o jsonpath={.status.conditions[?(@.type==\"Ready\")].status}" ] && echo False`, true},
		{"unreachable", `echo Unknown`, true},
		{"Ready", `echo True`, false},
		{"API down", `echo "connection refused" >&2; exit 1`, false},
		{"no answer", `exit 0`, false},
	} {
		if err := os.WriteFile(kubectl, []byte("#!/bin/sh\n"+tc.kubectl+"\n"), 0o755); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("sh", "-c", c.Hooks.PeerLostCheck).CombinedOutput()
		if (err == nil) != tc.down {
			t.Errorf("%s: check %v (%s), want confirmed down: %v", tc.name, err, out, tc.down)
		}
	}
}

// K3S registers nodeB as "nodeb": the hooks taint and untaint that name
// (tainting "nodeB" failed for good: no such node).
func TestK3SHooksUseLowerCaseNodeName(t *testing.T) {
	y, dir := k3sBase(t)
	kubectl := filepath.Join(dir, "kubectl")
	log := filepath.Join(dir, "kubectl.log")
	if err := os.WriteFile(kubectl, []byte("#!/bin/sh\necho \"$*\" >> "+log+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	c, err := Parse([]byte(y + "  kubectl: " + kubectl + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, hook := range []string{c.Hooks.PeerLost, c.Hooks.PeerBack} {
		cmd := exec.Command("sh", "-c", hook)
		cmd.Env = append(os.Environ(), "DUET_PEER=nodeB")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("hook %q: %v\n%s", hook, err, out)
		}
	}
	b, _ := os.ReadFile(log)
	want := "taint nodes nodeb node.kubernetes.io/out-of-service=nodeshutdown:NoExecute --overwrite\n" +
		"taint nodes nodeb node.kubernetes.io/out-of-service-\n"
	if string(b) != want {
		t.Fatalf("kubectl ran:\n%s\nwant:\n%s", b, want)
	}
}

// The database password guards the cluster's datastore: a password file
// that group or others can read is refused, as a key file is.
func TestK3SPasswordFileMode(t *testing.T) {
	y, dir := k3sBase(t)
	pw := filepath.Join(dir, "pw")
	if err := os.Chmod(pw, 0o644); err != nil {
		t.Fatal(err)
	}
	want := `k3s.password_file "` + pw + `": mode 0644 lets group or others read or write this secret: run chmod 600 ` + pw
	if _, err := Parse([]byte(y)); err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("error %v, want it to contain %q", err, want)
	}
}

// A client's root is squashed by default, by either server, and the
// export's root, if root's, becomes the anonymous user's so that the
// provisioner can make volumes in it; nfs_root_squash: false turns both
// off.
func TestK3SNFSRootSquash(t *testing.T) {
	y, _ := k3sBase(t)
	for _, tc := range []struct {
		edit          string
		chown, squash bool
	}{
		{"", true, true},
		{"  nfs_root_squash: true\n", true, true},
		{"  nfs_root_squash: false\n", false, false},
	} {
		for _, server := range []string{"duet", "ganesha"} {
			c, err := Parse([]byte(y + tc.edit + "  nfs_server: " + server + "\n"))
			if err != nil {
				t.Fatalf("%q: %v", tc.edit, err)
			}
			start := c.Services[1].Start
			if got := strings.Contains(start, "chown 65534:65534 "); got != tc.chown {
				t.Errorf("%q, %s: nfs start %q: chown of the export %v, want %v", tc.edit, server, start, got, tc.chown)
			}
			var got bool
			switch server {
			case "duet":
				got = !strings.Contains(start, " --no-root-squash")
			case "ganesha":
				conf := c.Files[0].Content
				got = strings.Contains(conf, "Squash = Root_Squash;") && strings.Contains(conf, "Anonymous_Uid = 65534;")
				if !got && !strings.Contains(conf, "Squash = No_Root_Squash;") {
					t.Errorf("%q: ganesha config without a Squash line:\n%s", tc.edit, conf)
				}
			}
			if got != tc.squash {
				t.Errorf("%q, %s: root squash %v, want %v (start %q)", tc.edit, server, got, tc.squash, start)
			}
		}
	}
}

// The NFS server (either) refuses calls from unprivileged ports unless
// k3s.nfs_insecure says otherwise.
func TestK3SNFSInsecure(t *testing.T) {
	y, _ := k3sBase(t)
	for _, tc := range []struct {
		edit     string
		insecure bool
	}{
		{"", false},
		{"  nfs_insecure: false\n", false},
		{"  nfs_insecure: true\n  nfs_root_squash: false\n", true},
	} {
		c, err := Parse([]byte(y + tc.edit))
		if err != nil {
			t.Fatalf("%q: %v", tc.edit, err)
		}
		start := c.Services[1].Start
		if got := strings.Contains(start, " --insecure"); got != tc.insecure {
			t.Errorf("%q: nfs start %q: --insecure %v, want %v", tc.edit, start, got, tc.insecure)
		}
		c, err = Parse([]byte(y + tc.edit + "  nfs_server: ganesha\n"))
		if err != nil {
			t.Fatalf("%q: %v", tc.edit, err)
		}
		if want := fmt.Sprintf("PrivilegedPort = %t;", !tc.insecure); !strings.Contains(c.Files[0].Content, want) {
			t.Errorf("%q: ganesha config without %q:\n%s", tc.edit, want, c.Files[0].Content)
		}
	}
}

// The NFS server serves the VIP's network by default, the networks named
// in k3s.nfs_clients, or everyone with [any].
func TestK3SNFSClients(t *testing.T) {
	y, _ := k3sBase(t)
	for _, tc := range []struct{ edit, want, not string }{
		{"", " --allow 10.250.0.0/24", ""},
		{"  nfs_clients: [192.168.7.0/24, 10.1.2.3]\n", " --allow 192.168.7.0/24 --allow 10.1.2.3", "10.250.0.0"},
		{"  nfs_clients: [any]\n", "--listen 0.0.0.0:2049", "--allow"},
	} {
		c, err := Parse([]byte(y + tc.edit))
		if err != nil {
			t.Fatalf("%q: %v", tc.edit, err)
		}
		start := c.Services[1].Start
		if !strings.HasSuffix(start, tc.want) || tc.not != "" && strings.Contains(start, tc.not) {
			t.Errorf("%q: nfs start %q, want it to end with %q and lack %q", tc.edit, start, tc.want, tc.not)
		}
	}
}
