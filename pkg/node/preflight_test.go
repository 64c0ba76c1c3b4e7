package node

import (
	"net"
	"strings"
	"testing"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/duet-ha/duet/pkg/loopfs"
)

func preflightConfig(t *testing.T, dir, listen, local, vipIface, metrics string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(`node: nodeA
role: primary
listen: ` + listen + `
peer: 127.0.0.2:7788
key: "0123456789abcdef"
state_dir: ` + t.TempDir() + `
replicate: [{path: ` + dir + `}]
cluster:
  heartbeat_port: 17789
  networks: [{local: ` + local + `, peer: 127.0.0.2}]
vip: {address: 10.250.0.100/24, interface: ` + vipIface + `}
metrics: ` + metrics + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// Preflight (duet run --check) reports every problem of this host at
// once, each naming its setting and the fix: an interface this host
// lacks, an address it does not have, a port another program holds.
func TestPreflightProblems(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	cfg := preflightConfig(t, t.TempDir(), "127.0.0.1:7788", "203.0.113.7", "duetnosuch0", held.Addr().String())
	_, problems := Preflight(cfg)
	var got []string
	for _, p := range problems {
		if !strings.HasPrefix(p.Error(), "replicate[0]") && !strings.HasPrefix(p.Error(), "capture:") { // this machine's /tmp and root
			got = append(got, p.Error())
		}
	}
	want := []string{
		`vip.interface: vip interface "duetnosuch0": Link not found (is it the right name on this host? see ` + "`ip link`)",
		`cluster.networks[0].local "203.0.113.7": 203.0.113.7 is not an address of this host (see ` + "`ip -br addr`): set this node's own address on that network",
		`metrics "` + held.Addr().String() + `": tcp port in use by another program (see ` + "`ss -lnp`): stop it or pick another port",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// On a host that has what the configuration names, Preflight finds no
// problem and lists the filesystem, the interface, the free ports, and
// the hooks the loaded BPF programs would attach.
func TestPreflightGoodHost(t *testing.T) {
	loopfs.RequireRoot(t)
	fs := loopfs.Make(t, "ext4", 64)
	cfg := preflightConfig(t, fs.Mount, "127.0.0.1:0", "127.0.0.1", "lo", "off")
	found, problems := Preflight(cfg)
	if len(problems) > 0 {
		t.Fatalf("problems: %v", problems)
	}
	out := strings.Join(found, "\n")
	for _, want := range []string{`replicate ` + cfg.Replicate[0].Name + ` "` + fs.Mount + `": ext4`, "vip 10.250.0.100/24 on lo: the interface is up",
		"listen 127.0.0.1:0 (tcp): free", "cluster.networks[0] heartbeats 127.0.0.1:17789 (udp): free",
		"capture: the BPF programs load; on taking the primary role it attaches", "  tp_btf ext4_da_write_end\n",
		"  tracepoint syscalls/sys_exit_splice (if this kernel has it)"} {
		if !strings.Contains(out, want) {
			t.Errorf("found lacks %q:\n%s", want, out)
		}
	}
}
