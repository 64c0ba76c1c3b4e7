package cli

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"text/template"

	"github.com/duet-ha/duet/pkg/config"
	"github.com/spf13/cobra"
)

// initOptions are the flags of `duet init k3s`.
type initOptions struct {
	this, nodes, vip, iface, witness string
	dataDir, stateDir, out           string
	keyFile, passwordFile, kubectl   string
	prefer                           string
	force, noMkdir                   bool
	// again is the flags to give on the other node, but --this: those
	// set here, so that it finds the key where it was copied to.
	again string
}

type siteNode struct{ Name, Addr string }

func newInit(s IOStreams) *cobra.Command {
	var o initOptions
	root := &cobra.Command{
		Use:   "init",
		Short: "Write a configuration for a two-node site",
	}
	k3s := &cobra.Command{
		Use:   "k3s",
		Short: "Write the k3s module's configuration for this node (MariaDB for K3S's datastore, NFS for volumes)",
		Long: `Writes a commented configuration for one node of a two-node K3S site, checked before it
is written: the replicated directories are created, and the cluster key and the
database password are generated unless their files exist. Run it on both nodes
with the same flags but --this, after copying the key and password files over.`,
		Example: `  duet init k3s --this nodeA --nodes nodeA=192.168.10.11,nodeB=192.168.10.12 \
      --vip 192.168.10.100/24 --interface eth0 --witness 192.168.10.1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, name := range []string{"nodes", "vip", "interface", "witness", "prefer", "data-dir", "state-dir",
				"key-file", "password-file", "kubectl", "out", "no-mkdir"} {
				f := cmd.Flags().Lookup(name)
				switch {
				case !f.Changed:
				case f.Value.Type() == "bool":
					o.again += " --" + name
				default:
					o.again += " --" + name + " " + shellQuote(f.Value.String())
				}
			}
			return initK3S(s, o)
		},
	}
	f := k3s.Flags()
	f.StringVar(&o.this, "this", "", "this node's name (one of --nodes)")
	f.StringVar(&o.nodes, "nodes", "", "both nodes as name=address,name=address (the replication network)")
	f.StringVar(&o.vip, "vip", "", "the virtual IP with its prefix length, e.g. 192.168.10.100/24")
	f.StringVar(&o.iface, "interface", "", "the interface that carries the VIP, e.g. eth0")
	f.StringVar(&o.witness, "witness", "", "an address both nodes can ping (the gateway); strongly advised")
	f.StringVar(&o.prefer, "prefer", "", "the node that serves whenever it can (automatic failback); default none")
	f.StringVar(&o.dataDir, "data-dir", config.DefaultK3SDataDir, "where the replicated directories live")
	f.StringVar(&o.stateDir, "state-dir", config.DefaultStateDir, "duet's own state (not replicated)")
	f.StringVar(&o.keyFile, "key-file", "/etc/duet/key", "cluster key, generated if missing (copy it to the other node)")
	f.StringVar(&o.passwordFile, "password-file", "/etc/duet/k3s-db.password", "database password, generated if missing (copy it to the other node)")
	f.StringVar(&o.kubectl, "kubectl", "k3s kubectl", `how to run kubectl, or "off"`)
	f.StringVarP(&o.out, "out", "o", "/etc/duet/duet.yaml", `where to write the configuration ("-": standard output)`)
	f.BoolVar(&o.force, "force", false, "overwrite an existing configuration")
	f.BoolVar(&o.noMkdir, "no-mkdir", false, "do not create the replicated directories (they must exist)")
	root.AddCommand(k3s)
	return root
}

// parseNodes reads "a=1.2.3.4,b=1.2.3.5" and puts this node first.
func parseNodes(spec, this string) (self, peer siteNode, err error) {
	parts := strings.Split(spec, ",")
	if len(parts) != 2 {
		return self, peer, fmt.Errorf("--nodes %q: want exactly two nodes as name=address,name=address", spec)
	}
	var ns []siteNode
	for _, p := range parts {
		name, addr, ok := strings.Cut(strings.TrimSpace(p), "=")
		ip, perr := netip.ParseAddr(addr)
		if !ok || perr != nil || !ip.Is4() {
			return self, peer, fmt.Errorf("--nodes: %q is not name=IPv4 address", p)
		}
		ns = append(ns, siteNode{name, addr})
	}
	if ns[0].Name == ns[1].Name || ns[0].Addr == ns[1].Addr {
		return self, peer, fmt.Errorf("--nodes %q: the two nodes need different names and addresses", spec)
	}
	switch this {
	case ns[0].Name:
		return ns[0], ns[1], nil
	case ns[1].Name:
		return ns[1], ns[0], nil
	}
	return self, peer, fmt.Errorf("--this %q: must be one of the --nodes (%s, %s)", this, ns[0].Name, ns[1].Name)
}

var k3sTemplate = template.Must(template.New("k3s").Parse(`# duet: {{.Self.Name}} of a two-node K3S site (written by duet init k3s).
# The other node's file differs only in node, role, listen and peer.
# Reference: https://github.com/duet-ha/duet#configuration
node: {{.Self.Name}}
# The node that starts as primary; afterwards roles follow failures and
# duet swap, and are kept in state_dir across restarts.
role: {{.Role}}
listen: {{.Self.Addr}}:7788        # replication and verify, from the peer
peer: {{.Peer.Addr}}:7788
key_file: {{.KeyFile}}   # the same secret on both nodes
state_dir: {{.StateDir}}

cluster:
  # heartbeats every 200ms; the peer counts as lost after 1.2s without one
  interval: 200ms
  timeout: 1200ms
{{- if .Witness}}
  # a node takes over only if it reaches the witness, and a primary that
  # reaches neither its peer nor the witness steps down
  witness: {{.Witness}}
{{- else}}
  # witness: 192.168.10.1   # the gateway: strongly advised (an isolated primary steps down)
{{- end}}
{{- if .Prefer}}
  prefer: {{.Prefer}}           # serves whenever it is back and a mirror
  failback_delay: 30s
{{- end}}
  # a node that last served with its peer in sync takes nothing over at
  # start until it hears the peer (which may have served after it): a
  # duration serves after it, and "duet prim" at once
  start_wait: forever

vip:
  address: {{.VIP}}
  interface: {{.Iface}}

# The k3s module replicates MariaDB's data directory (K3S's datastore) and
# the NFS export (persistent volumes), and runs on the primary, in order:
# MariaDB (every commit is fsynced: innodb_flush_log_at_trx_commit=1,
# innodb_flush_method=fsync; each fsync waits until the peer has the
# data) and duet's NFS server (NFSv3; its file handles are kept in the
# export, so clients keep their mounts when the stack moves). K3S runs on
# both nodes as a server with --tls-san {{.VIPAddr}}, the same token
# (K3S_TOKEN) and, in its environment rather than on its command line
# (which ps shows),
#   K3S_DATASTORE_ENDPOINT='mysql://kine:PASSWORD@tcp({{.VIPAddr}}:3306)/kine'
# and volumes come from nfs-subdir-external-provisioner with server
# {{.VIPAddr}}, path / and the mount options
#   nfsvers=3,proto=tcp,port=2049,mountport=2049,mountproto=tcp,nolock
module: k3s
k3s:
  data_dir: {{.DataDir}}   # mysql/ and nfs/ below it
  password_file: {{.PasswordFile}}   # the same on both nodes
  # mysql_port: 3306
  # nfs_server: duet       # or ganesha (NFSv4: clients must remount after each failover)
  # nfs_clients: [{{.VIPNet}}]   # client networks the NFS server serves; calls act as the uid the client names
  # nfs_root_squash: true   # a client's root acts as 65534, which owns the export's root; false: as root
  # nfs_insecure: false    # true: serve calls from unprivileged client ports (any user there can claim any uid)
  # Once a lost peer is confirmed down (cluster.fence succeeded, or it was
  # silent for hooks.peer_lost_after, 60s, and Kubernetes sees it NotReady),
  # its pods are force-deleted and rescheduled here:
  #   kubectl taint nodes PEER node.kubernetes.io/out-of-service=nodeshutdown:NoExecute
  # and the taint is removed once the peer is a mirror again.
  kubectl: {{.Kubectl}}
  # peer_kube_node: {{.Peer.Name}}   # the peer's Kubernetes node name, if not its duet name in lower case

metrics: 127.0.0.1:9788
`))

func initK3S(s IOStreams, o initOptions) error {
	var errs []error
	self, peer, err := parseNodes(o.nodes, o.this)
	if err != nil {
		errs = append(errs, err)
	}
	p, perr := netip.ParsePrefix(o.vip)
	if perr != nil || !p.Addr().Is4() {
		errs = append(errs, fmt.Errorf("--vip %q: want an IPv4 address with its prefix length, e.g. 192.168.10.100/24", o.vip))
	}
	if o.iface == "" {
		errs = append(errs, errors.New("--interface: name the interface that carries the VIP, e.g. eth0"))
	}
	if o.witness != "" && net.ParseIP(o.witness) == nil {
		errs = append(errs, fmt.Errorf("--witness %q: want an IP address (e.g. the gateway)", o.witness))
	}
	if o.prefer != "" && o.prefer != self.Name && o.prefer != peer.Name && err == nil {
		errs = append(errs, fmt.Errorf("--prefer %q: must be one of the nodes", o.prefer))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if o.out != "-" && !o.force {
		if _, err := os.Stat(o.out); err == nil {
			return fmt.Errorf("%s exists: --force to overwrite it", o.out)
		}
	}
	var made []string
	if !o.noMkdir {
		for _, d := range []string{"mysql", "nfs"} {
			dir := filepath.Join(o.dataDir, d)
			if _, err := os.Stat(dir); err == nil {
				continue
			}
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return err
			}
			made = append(made, dir)
		}
	}
	for _, sec := range []struct {
		path string
		gen  func() (string, error)
	}{{o.keyFile, genHex}, {o.passwordFile, genPassword}} {
		if _, err := os.Stat(sec.path); err == nil {
			continue
		}
		v, err := sec.gen()
		if err != nil {
			return err
		}
		if err := os.MkdirAll(filepath.Dir(sec.path), 0o700); err != nil {
			return err
		}
		if err := os.WriteFile(sec.path, []byte(v+"\n"), 0o600); err != nil {
			return err
		}
		made = append(made, sec.path)
	}
	role := config.RoleSecondary
	if self.Name < peer.Name && o.prefer == "" || o.prefer == self.Name {
		role = config.RolePrimary
	}
	kubectl := o.kubectl
	if strings.ContainsAny(kubectl, "\"#:") {
		kubectl = fmt.Sprintf("%q", kubectl)
	}
	var b strings.Builder
	if err := k3sTemplate.Execute(&b, map[string]any{"Self": self, "Peer": peer, "Role": role, "VIP": o.vip,
		"VIPAddr": p.Addr().String(), "VIPNet": p.Masked().String(), "Iface": o.iface, "Witness": o.witness, "Prefer": o.prefer,
		"DataDir": o.dataDir, "StateDir": o.stateDir, "KeyFile": o.keyFile, "PasswordFile": o.passwordFile,
		"Kubectl": kubectl}); err != nil {
		return err
	}
	if _, err := config.Parse([]byte(b.String())); err != nil {
		return fmt.Errorf("the configuration does not check (nothing written): %w", err)
	}
	for _, m := range made {
		fmt.Fprintf(s.Err, "created %s\n", m)
	}
	if o.out == "-" {
		_, err := fmt.Fprint(s.Out, b.String())
		return err
	}
	if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(o.out+".tmp", []byte(b.String()), 0o600); err != nil {
		return err
	}
	if err := os.Rename(o.out+".tmp", o.out); err != nil {
		return err
	}
	fmt.Fprintf(s.Out, "wrote %s for %s (%s); next:\n", o.out, self.Name, role)
	fmt.Fprintf(s.Out, "  copy %s and %s to %s, then run there:\n", o.keyFile, o.passwordFile, peer.Name)
	fmt.Fprintf(s.Out, "    duet init k3s --this %s%s\n", peer.Name, o.again)
	fmt.Fprintf(s.Out, "  start duet on both nodes (systemctl enable --now duet), then `duet status`\n")
	return nil
}

// shellQuote quotes v for sh, if it needs it.
func shellQuote(v string) string {
	if v != "" && strings.Trim(v, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./=,:@%+-") == "" {
		return v
	}
	return "'" + strings.ReplaceAll(v, "'", `'\''`) + "'"
}

func genHex() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return hex.EncodeToString(b), nil
}

func genPassword() (string, error) {
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}
