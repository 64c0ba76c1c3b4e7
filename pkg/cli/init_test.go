package cli

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/config"
)

func TestInitK3S(t *testing.T) {
	dir := t.TempDir()
	flags := func(this string) []string {
		return []string{"init", "k3s", "--this", this, "--nodes", "nodeA=192.168.10.11,nodeB=192.168.10.12",
			"--vip", "192.168.10.100/24", "--interface", "eth0", "--witness", "192.168.10.1",
			"--data-dir", filepath.Join(dir, "k3s"), "--state-dir", filepath.Join(dir, "state-"+this),
			"--key-file", filepath.Join(dir, "key"), "--password-file", filepath.Join(dir, "pw"),
			"-o", filepath.Join(dir, this+".yaml")}
	}
	out, code := run(flags("nodeA")...)
	if code != 0 {
		t.Fatalf("init: %d %s", code, out)
	}
	for _, want := range []string{"created " + filepath.Join(dir, "k3s", "mysql"), "created " + filepath.Join(dir, "pw"),
		"wrote " + filepath.Join(dir, "nodeA.yaml") + " for nodeA (primary)",
		// The other node's command has every flag given here: it must find
		// the key and password where they were copied to, not make new ones.
		"\n    duet init k3s --this nodeB --nodes nodeA=192.168.10.11,nodeB=192.168.10.12 --vip 192.168.10.100/24 --interface eth0 --witness 192.168.10.1" +
			" --data-dir " + filepath.Join(dir, "k3s") + " --state-dir " + filepath.Join(dir, "state-nodeA") +
			" --key-file " + filepath.Join(dir, "key") + " --password-file " + filepath.Join(dir, "pw") + " --out " + filepath.Join(dir, "nodeA.yaml") + "\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	// The secrets are the owner's alone: the configuration refuses them otherwise.
	for _, f := range []string{"key", "pw"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: mode %v, want 0600", f, st.Mode())
		}
	}
	a, err := config.Load(filepath.Join(dir, "nodeA.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if a.Module != "k3s" || a.Peer != "192.168.10.12:7788" || a.Cluster.Witness != "192.168.10.1" || len(a.Replicate) != 2 ||
		a.VIP.Address != "192.168.10.100/24" || !strings.Contains(a.Hooks.PeerLost, "k3s kubectl taint") {
		t.Fatalf("config: %+v", a)
	}
	// The other node, with the same key and password files: secondary.
	if out, code := run(flags("nodeB")...); code != 0 || !strings.Contains(out, "for nodeB (secondary)") {
		t.Fatalf("init nodeB: %d %s", code, out)
	}
	b, err := config.Load(filepath.Join(dir, "nodeB.yaml"))
	if err != nil || b.Listen != "192.168.10.12:7788" || b.Role != "secondary" {
		t.Fatalf("nodeB: %v %+v", err, b)
	}
	// An existing file is kept.
	if out, code := run(flags("nodeA")...); code == 0 || !strings.Contains(out, "exists: --force to overwrite it") {
		t.Fatalf("overwrite without --force: %d %s", code, out)
	}
}

func TestInitK3SBadFlags(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--this", "nodeC", "--nodes", "nodeA=10.0.0.1,nodeB=10.0.0.2", "--vip", "10.0.0.9/24", "--interface", "eth0"}, `--this "nodeC": must be one of the --nodes`},
		{[]string{"--this", "nodeA", "--nodes", "nodeA=10.0.0.1", "--vip", "10.0.0.9/24", "--interface", "eth0"}, "want exactly two nodes"},
		{[]string{"--this", "nodeA", "--nodes", "nodeA=10.0.0.1,nodeB=host", "--vip", "10.0.0.9/24", "--interface", "eth0"}, `"nodeB=host" is not name=IPv4 address`},
		{[]string{"--this", "nodeA", "--nodes", "nodeA=10.0.0.1,nodeB=10.0.0.2", "--vip", "10.0.0.9", "--interface", "eth0"}, `--vip "10.0.0.9": want an IPv4 address with its prefix length`},
		{[]string{"--this", "nodeA", "--nodes", "nodeA=10.0.0.1,nodeB=10.0.0.2", "--vip", "10.0.0.9/24"}, "--interface: name the interface"},
		{[]string{"--this", "nodeA", "--nodes", "nodeA=10.0.0.1,nodeB=10.0.0.2", "--vip", "10.0.0.9/24", "--interface", "eth0", "--data-dir", "relative"}, "must be an absolute path"},
	} {
		args := append([]string{"init", "k3s", "--key-file", filepath.Join(dir, "key"), "--password-file", filepath.Join(dir, "pw"),
			"--state-dir", filepath.Join(dir, "state"), "--no-mkdir", "-o", filepath.Join(dir, "out.yaml")}, tc.args...)
		out, code := run(args...)
		if code == 0 || !strings.Contains(out, tc.want) {
			t.Errorf("%v: %d %s, want %q", tc.args, code, out, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "out.yaml")); err == nil {
		t.Fatal("a configuration was written although it did not check")
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{"/etc/duet/key": "/etc/duet/key", "k3s kubectl": "'k3s kubectl'", "it's": `'it'\''s'`, "": "''"} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}
