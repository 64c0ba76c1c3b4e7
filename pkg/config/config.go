// Package config reads and checks duet's YAML configuration. Every error
// names the field at fault and what would fix it.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Roles a node can be started in.
const (
	RolePrimary   = "primary"
	RoleSecondary = "secondary"
)

// Config is one node's configuration.
type Config struct {
	// Node names this node in logs and status.
	Node string `yaml:"node"`
	// Role is primary or secondary.
	Role string `yaml:"role"`
	// Listen is the address peers and verify connect to (host:port).
	Listen string `yaml:"listen"`
	// Peer is the other node's listen address.
	Peer string `yaml:"peer"`
	// Key is the pre-shared cluster key; KeyFile names a file holding it.
	Key     string `yaml:"key"`
	KeyFile string `yaml:"key_file"`
	// PreviousKey or PreviousKeyFile is the key being replaced during a
	// key rotation (docs/SECURITY.md): still trusted from the peer, no
	// longer used to prove this node. Optional.
	PreviousKey     string `yaml:"previous_key"`
	PreviousKeyFile string `yaml:"previous_key_file"`
	// InsecurePlaintextLink turns TLS off between the nodes: replication
	// then travels unencrypted, and anyone on the path can alter it after
	// the handshake. Both nodes must agree. Default false (TLS).
	InsecurePlaintextLink bool `yaml:"insecure_plaintext_link"`
	// StateDir holds replica progress and the control socket.
	StateDir string `yaml:"state_dir"`
	// Socket is the control socket; default <state_dir>/duet.sock.
	Socket string `yaml:"socket"`
	// RingBufferKiB sizes the capture ring buffer (a power of two, at
	// least 4). A record is 56 bytes; when the buffer fills, the files
	// concerned are rescanned.
	RingBufferKiB int `yaml:"ring_buffer_kib"`
	// Replicate lists the replicated directories.
	Replicate []Replicate `yaml:"replicate"`
	// Cluster tunes heartbeats and takeover.
	Cluster Cluster `yaml:"cluster"`
	// VIP is the virtual IP that follows the primary; optional.
	VIP *VIP `yaml:"vip"`
	// Services run on the primary, started in order.
	Services []Service `yaml:"services"`
	// Metrics is the local address of the Prometheus endpoint, or "off".
	Metrics string `yaml:"metrics"`
	// Pprof also serves the Go runtime's profiles (heap, CPU, goroutines)
	// at /debug/pprof/ on the metrics address. Off by default: anyone who
	// reaches that address can read them and have the daemon profile its
	// CPU.
	Pprof bool `yaml:"pprof"`
	// Resync tunes how a returning node is brought level.
	Resync Resync `yaml:"resync"`
	// Hooks are commands run on cluster events.
	Hooks Hooks `yaml:"hooks"`
	// Module selects a ready set of replicated directories, services and
	// hooks ("k3s"), configured by its own section; they come before the
	// directories and services listed above.
	Module string `yaml:"module"`
	K3S    *K3S   `yaml:"k3s"`

	// Files are written by the daemon before it starts the services.
	Files []File `yaml:"-"`
}

// Hooks are shell commands run on cluster events, with DUET_NODE and
// DUET_PEER (node names) in their environment. A failing hook is retried
// every 5 s for 10 minutes; it never blocks or undoes a role change.
type Hooks struct {
	// PeerLost runs on the serving node when it lost its peer (it took
	// over from a lost primary, or its secondary is lost) and that peer
	// is confirmed down: the fencing command succeeded for this loss, or
	// the peer has been silent for PeerLostAfter and PeerLostCheck, if
	// set, succeeds. A peer heard again before that runs nothing: a
	// restarted daemon or a short link failure is not a node down.
	PeerLost string `yaml:"peer_lost"`
	// PeerLostAfter is how long an unfenced peer must have been silent
	// (since its last heartbeat) before it can be confirmed down;
	// default 60s.
	PeerLostAfter time.Duration `yaml:"peer_lost_after"`
	// PeerLostCheck, when set, must exit 0 before PeerLost runs for an
	// unfenced peer; it is tried every 5 s while the peer stays silent.
	// The k3s module's checks that Kubernetes sees the peer's node
	// NotReady.
	PeerLostCheck string `yaml:"peer_lost_check"`
	// PeerBack runs once the peer that PeerLost ran for is a mirror
	// again, or serves itself; it is retried until it succeeds, across
	// restarts of the daemon.
	PeerBack string `yaml:"peer_back"`
}

// Resync tunes resynchronisation.
type Resync struct {
	// Margin is taken off a sync point before files are picked by their
	// ctime/mtime after a crash: it covers the difference between the two
	// nodes' clocks. Default 30s.
	Margin time.Duration `yaml:"margin"`
	// RateMiB bounds the data a resync sends, in MiB/s (0: no bound),
	// like DRBD's resync rate: live changes keep the rest of the link.
	RateMiB int `yaml:"rate_mib"`
}

// Cluster is the heartbeat and takeover configuration.
type Cluster struct {
	// HeartbeatPort is the UDP port heartbeats use on every network.
	HeartbeatPort int `yaml:"heartbeat_port"`
	// Networks lists the heartbeat paths (local and peer address each);
	// default: the hosts of listen and peer.
	Networks []Network `yaml:"networks"`
	// Interval between heartbeats; Timeout without any before the peer
	// counts as lost.
	Interval time.Duration `yaml:"interval"`
	Timeout  time.Duration `yaml:"timeout"`
	// Witness is an address (e.g. the default gateway) that a node must
	// reach by ping before it takes over, and without which a primary
	// that also lost its peer steps down. It does not stop two
	// primaries when only the link between the nodes breaks (both
	// reach it): the VIP's ARP probe or Fence does.
	Witness string `yaml:"witness"`
	// Fence is a command run before a takeover (it powers off or
	// isolates the peer); if it fails, no takeover. Required without a
	// VIP.
	Fence string `yaml:"fence"`
	// AloneWrites says what a supervised durability call does when no
	// peer is in sync: "release" (default, like DRBD with a disconnected
	// peer: the change is tracked for a resync) or "fail" (EIO).
	AloneWrites string `yaml:"alone_writes"`
	// Prefer names the node that should serve whenever it can: once it
	// is back and has been a mirror for FailbackDelay, the other node
	// hands the role back to it (an automatic duet swap). Empty: roles
	// move only on failures and commands.
	Prefer        string        `yaml:"prefer"`
	FailbackDelay time.Duration `yaml:"failback_delay"`
	// StartWait is how long a node that starts without hearing its peer
	// waits for it before taking over, when it last served with the peer
	// in sync: the peer may have taken over after this node went down,
	// served alone and acknowledged writes this copy lacks, and then gone
	// down too (a site losing its power node by node). "forever"
	// (default: as DRBD's wfc-timeout) until the peer is heard or the
	// operator runs `duet prim`; a duration; "0s" never waits. A node
	// that last served alone does not wait, nor one stopped after its
	// peer said its copy is stale.
	StartWait string `yaml:"start_wait"`
}

// StartWaitForever is cluster.start_wait's default.
const StartWaitForever = "forever"

// StartWaitFor is cluster.start_wait: forever, or how long to wait (0:
// no wait). Validate has checked it.
func (cl Cluster) StartWaitFor() (d time.Duration, forever bool) {
	if cl.StartWait == StartWaitForever || cl.StartWait == "" {
		return 0, true
	}
	d, _ = time.ParseDuration(cl.StartWait)
	return d, false
}

// Network is one heartbeat path.
type Network struct {
	Local string `yaml:"local"`
	Peer  string `yaml:"peer"`
}

// VIP is the virtual IP.
type VIP struct {
	// Address with prefix length, e.g. 10.250.0.100/24.
	Address string `yaml:"address"`
	// Interface carries it, e.g. eth0.
	Interface string `yaml:"interface"`
}

// Service is one managed service.
type Service struct {
	Name string `yaml:"name"`
	// Start runs in the foreground for the service's lifetime (sh -c),
	// supervised so that its fsyncs wait for the peer.
	Start string `yaml:"start"`
	// Stop, if set, runs before the service's processes get SIGTERM.
	Stop string `yaml:"stop"`
	// CheckTCP (host:port) or CheckCommand; with neither, the process
	// must stay alive.
	CheckTCP      string        `yaml:"check_tcp"`
	CheckCommand  string        `yaml:"check_command"`
	CheckInterval time.Duration `yaml:"check_interval"`
	StartTimeout  time.Duration `yaml:"start_timeout"`
	StopTimeout   time.Duration `yaml:"stop_timeout"`
	// CheckNFS (host:port) calls the NFS server's NULL procedure.
	CheckNFS string `yaml:"check_nfs"`
	// Restarts are local restarts before failing over (default 3; 0
	// fails over at the first failure).
	Restarts *int `yaml:"restarts"`

	from string // the module that made it, for error messages
}

// Replicate is one replicated directory.
type Replicate struct {
	// Name identifies the directory on both nodes; default: base name.
	Name string `yaml:"name"`
	// Path is the local directory.
	Path string `yaml:"path"`
	// Mode is "sync" (default: a durability call of a supervised process
	// returns once its data is durable on the peer) or "async" (it returns
	// at once while the replication lag is under MaxLag, and waits for the
	// lag to come back under it otherwise).
	Mode string `yaml:"mode"`
	// MaxLag bounds the lag of an async directory; default 2s.
	MaxLag time.Duration `yaml:"max_lag"`

	from string // the module setting that made it, for error messages
}

// Replication modes.
const (
	ModeSync  = "sync"
	ModeAsync = "async"
)

// What durability calls do while no peer is in sync (AloneWrites).
const (
	AloneRelease = "release" // return: the node runs unprotected, changes are kept for a resync
	AloneFail    = "fail"    // fail with EIO: stop rather than run unprotected
)

// Defaults.
const (
	DefaultMaxLag   = 2 * time.Second
	DefaultStateDir = "/var/lib/duet"
	DefaultRingKiB  = 16 << 10
	DefaultPort     = "7788"
	DefaultHBPort   = 7789
	DefaultInterval = 200 * time.Millisecond
	DefaultTimeout  = 1200 * time.Millisecond
	DefaultMetrics  = "127.0.0.1:9788"
	DefaultRestarts = 3
	DefaultMargin   = 30 * time.Second
	DefaultFailback = 10 * time.Second
	// DefaultPeerLostAfter is longer than Kubernetes takes to mark a
	// silent node NotReady (its node monitor grace period, 40-50 s).
	DefaultPeerLostAfter = 60 * time.Second
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Load reads, defaults and validates the file at path.
func Load(path string) (*Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		// Wrapped: the CLI names its flags when the file does not exist.
		return nil, fmt.Errorf("config %s: %w", path, unwrapPathErr(err))
	}
	c, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Parse decodes YAML strictly (unknown fields are errors), applies
// defaults and validates. Its error lists every problem of the file, one
// a line with its line number: those of decoding (unknown keys, values of
// the wrong type) and those of validation together, so that one run shows
// them all. Only a YAML syntax error comes alone.
func Parse(b []byte) (*Config, error) {
	var c Config
	ck, err := decode(b, &c)
	if err != nil {
		return nil, fmt.Errorf("parsing YAML: %w", err)
	}
	c.defaults()
	ck.validation(c.check())
	if len(ck.problems) > 0 {
		return nil, ck.sorted()
	}
	return &c, nil
}

func (c *Config) defaults() {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.Socket == "" {
		c.Socket = filepath.Join(c.StateDir, "duet.sock")
	}
	if c.RingBufferKiB == 0 {
		c.RingBufferKiB = DefaultRingKiB
	}
	if c.Module == ModuleK3S {
		if c.K3S == nil {
			c.K3S = &K3S{}
		}
		c.K3S.defaults(c)
		c.K3S.expand(c)
	}
	for i := range c.Replicate {
		r := &c.Replicate[i]
		if r.Name == "" {
			r.Name = filepath.Base(filepath.Clean(r.Path))
		}
		if r.Mode == "" {
			r.Mode = ModeSync
		}
		if r.MaxLag == 0 && r.Mode == ModeAsync {
			r.MaxLag = DefaultMaxLag
		}
	}
	cl := &c.Cluster
	if cl.AloneWrites == "" {
		cl.AloneWrites = AloneRelease
	}
	if cl.FailbackDelay == 0 {
		cl.FailbackDelay = DefaultFailback
	}
	if cl.StartWait == "" {
		cl.StartWait = StartWaitForever
	}
	if cl.HeartbeatPort == 0 {
		cl.HeartbeatPort = DefaultHBPort
	}
	if cl.Interval == 0 {
		cl.Interval = DefaultInterval
	}
	if cl.Timeout == 0 {
		cl.Timeout = DefaultTimeout
	}
	if len(cl.Networks) == 0 {
		lh, _, _ := net.SplitHostPort(c.Listen)
		ph, _, _ := net.SplitHostPort(c.Peer)
		cl.Networks = []Network{{Local: lh, Peer: ph}}
	}
	if c.Metrics == "" {
		c.Metrics = DefaultMetrics
	}
	if c.Resync.Margin == 0 {
		c.Resync.Margin = DefaultMargin
	}
	if c.Hooks.PeerLostAfter == 0 {
		c.Hooks.PeerLostAfter = DefaultPeerLostAfter
	}
	for i := range c.Services {
		s := &c.Services[i]
		if s.CheckInterval == 0 {
			s.CheckInterval = 2 * time.Second
		}
		if s.StartTimeout == 0 {
			s.StartTimeout = 30 * time.Second
		}
		if s.StopTimeout == 0 {
			s.StopTimeout = 10 * time.Second
		}
		if s.Restarts == nil {
			n := DefaultRestarts
			s.Restarts = &n
		}
	}
}

// Validate checks every field. It does not touch the network.
func (c *Config) Validate() error { return errors.Join(c.check()...) }

// check returns every problem Validate finds, each starting with the key
// path it is about (Parse finds its line from it).
func (c *Config) check() []error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if !nameRE.MatchString(c.Node) {
		bad("node %q: must be 1-63 letters, digits, '.', '_' or '-'", c.Node)
	}
	if c.Role != RolePrimary && c.Role != RoleSecondary {
		bad("role %q: must be %q or %q", c.Role, RolePrimary, RoleSecondary)
	}
	for _, f := range []struct {
		field, addr string
		min         int
	}{{"listen", c.Listen, 0}, {"peer", c.Peer, 1}} {
		if !hostPortFrom(f.addr, f.min) {
			bad("%s %q: want host:port with a port %d-65535, e.g. 10.250.0.2:%s", f.field, f.addr, f.min, DefaultPort)
		}
	}
	switch {
	case c.Key == "" && c.KeyFile == "":
		bad("key: set key or key_file (the same secret on both nodes)")
	case c.Key != "" && c.KeyFile != "":
		bad("key and key_file are both set: keep one")
	default:
		if _, err := c.ReadKey(); err != nil {
			bad("%v", err)
		}
	}
	if c.PreviousKey != "" && c.PreviousKeyFile != "" {
		bad("previous_key and previous_key_file are both set: keep one")
	} else if k, err := c.ReadKey(); err == nil {
		if _, err := c.readPrevious(k); err != nil {
			bad("%v", err)
		}
	}
	if k := c.RingBufferKiB; k < 4 || k > 1<<20 || k&(k-1) != 0 {
		bad("ring_buffer_kib %d: must be a power of two between 4 and 1048576", k)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state_dir %q: must be an absolute path", c.StateDir)
	}
	switch {
	case c.Module != "" && c.Module != ModuleK3S:
		bad("module %q: the only module is %q (or leave it empty)", c.Module, ModuleK3S)
	case c.Module == "" && c.K3S != nil:
		bad("k3s: this section configures the k3s module: add `module: k3s`")
	case c.Module == ModuleK3S:
		c.K3S.validate(bad)
		c.k3sPorts(bad)
	}
	if len(c.Replicate) == 0 {
		bad("replicate: list at least one directory")
	}
	names := map[string]int{}
	repMod := 0 // a module's directories come first; indexes count the user's
	for _, r := range c.Replicate {
		if r.from != "" {
			repMod++
		}
	}
	for i, r := range c.Replicate {
		if !filepath.IsAbs(r.Path) {
			bad("replicate[%d].path %q: must be an absolute path", i-repMod, r.Path)
			continue
		}
		if !nameRE.MatchString(r.Name) {
			bad("replicate[%d].name %q: must be 1-63 letters, digits, '.', '_' or '-'", i-repMod, r.Name)
		}
		if j, dup := names[r.Name]; dup {
			if c.Replicate[j].from != "" {
				bad("replicate[%d].name %q: already used by %s: pick another name", i-repMod, r.Name, c.Replicate[j].from)
			} else {
				bad("replicate[%d].name %q: already used by replicate[%d]", i-repMod, r.Name, j-repMod)
			}
		}
		names[r.Name] = i
		switch {
		case r.Mode != ModeSync && r.Mode != ModeAsync:
			bad("replicate[%d].mode %q: must be %q or %q", i-repMod, r.Mode, ModeSync, ModeAsync)
		case r.Mode == ModeSync && r.MaxLag != 0:
			bad("replicate[%d].max_lag %s: only for mode %q", i-repMod, r.MaxLag, ModeAsync)
		case r.MaxLag < 0:
			bad("replicate[%d].max_lag %s: must be positive", i-repMod, r.MaxLag)
		}
		field := fmt.Sprintf("replicate[%d].path", i-repMod)
		if r.from != "" {
			field = r.from
		}
		if st, err := os.Stat(r.Path); err != nil {
			hint := ""
			switch {
			case r.from != "":
				hint = " (`duet init k3s` creates it; create it on both nodes)"
			case errors.Is(err, fs.ErrNotExist):
				hint = fmt.Sprintf(": create it on both nodes (mkdir -p %s), or correct the path", shq(r.Path))
			}
			bad("%s %q: %v%s", field, r.Path, unwrapPathErr(err), hint)
		} else if !st.IsDir() {
			bad("%s %q: not a directory", field, r.Path)
		}
		if within(c.StateDir, r.Path) {
			bad("state_dir %q: must not be inside %s %q", c.StateDir, field, r.Path)
		}
		if c.Socket != "" && within(c.Socket, r.Path) {
			bad("socket %q: must not be inside %s %q", c.Socket, field, r.Path)
		}
		// Two replicated directories, one inside the other (or the
		// same one twice): both would capture, ship and resync the
		// same files.
		for j, o := range c.Replicate[:i] {
			if !filepath.IsAbs(o.Path) || !within(r.Path, o.Path) && !within(o.Path, r.Path) {
				continue
			}
			other := fmt.Sprintf("replicate[%d].path", j-repMod)
			if o.from != "" {
				other = o.from
			}
			bad("%s %q: the same tree as %s %q (one holds the other): replicate one of them", field, r.Path, other, o.Path)
		}
	}
	if c.Socket != "" && !filepath.IsAbs(c.Socket) {
		bad("socket %q: must be an absolute path (by default %s)", c.Socket, filepath.Join(c.StateDir, "duet.sock"))
	}
	if c.Resync.Margin < 0 {
		bad("resync.margin %s: must be positive", c.Resync.Margin)
	}
	if c.Resync.RateMiB < 0 {
		bad("resync.rate_mib %d: must be 0 (no bound) or a positive number of MiB/s", c.Resync.RateMiB)
	}
	c.validateCluster(bad)
	return errs
}

func (c *Config) validateCluster(bad func(string, ...any)) {
	cl := c.Cluster
	if cl.AloneWrites != AloneRelease && cl.AloneWrites != AloneFail {
		bad("cluster.alone_writes %q: must be %q or %q", cl.AloneWrites, AloneRelease, AloneFail)
	}
	if cl.Prefer != "" && !nameRE.MatchString(cl.Prefer) {
		bad("cluster.prefer %q: must be a node name (1-63 letters, digits, '.', '_' or '-')", cl.Prefer)
	}
	if cl.FailbackDelay < 0 {
		bad("cluster.failback_delay %s: must be positive", cl.FailbackDelay)
	}
	if cl.StartWait != StartWaitForever {
		if d, err := time.ParseDuration(cl.StartWait); err != nil || d < 0 {
			bad("cluster.start_wait %q: want %q or a duration such as 10m (0s: never wait for the peer at start)", cl.StartWait, StartWaitForever)
		}
	}
	if cl.HeartbeatPort < 1 || cl.HeartbeatPort > 65535 {
		bad("cluster.heartbeat_port %d: must be 1-65535", cl.HeartbeatPort)
	}
	if cl.Interval < 10*time.Millisecond {
		bad("cluster.interval %s: must be at least 10ms", cl.Interval)
	}
	if cl.Timeout < 3*cl.Interval {
		bad("cluster.timeout %s: must be at least 3 heartbeat intervals (%s)", cl.Timeout, 3*cl.Interval)
	}
	// Both nodes number their epochs from these addresses (EpochID):
	// each must be a real address of its node, none on both sides.
	locals := map[netip.Addr]bool{}
	for _, n := range cl.Networks {
		if a, err := netip.ParseAddr(n.Local); err == nil {
			locals[a.Unmap()] = true
		}
	}
	for i, n := range cl.Networks {
		if ip := net.ParseIP(n.Local); ip == nil {
			bad("cluster.networks[%d].local %q: want an IP address of this node", i, n.Local)
		} else if ip.IsUnspecified() {
			bad("cluster.networks[%d].local %q: want this node's own address, not a wildcard (by default the host of listen)", i, n.Local)
		}
		if net.ParseIP(n.Peer) == nil {
			bad("cluster.networks[%d].peer %q: want an IP address of the peer", i, n.Peer)
		} else if a, err := netip.ParseAddr(n.Peer); err == nil && locals[a.Unmap()] {
			bad("cluster.networks[%d].peer %q: also a local address of this node: want the peer's own address (by default the host of peer)", i, n.Peer)
		}
	}
	// The takeover checks stop a node from taking over a live primary
	// only through the VIP (its ARP probe) or fencing. The witness only
	// makes an isolated primary step down: when the link between the
	// nodes breaks while both reach the witness, both would serve.
	if c.VIP == nil && strings.TrimSpace(cl.Fence) == "" {
		bad("cluster: neither vip nor cluster.fence is set: nothing stops both nodes serving after a network split; " +
			"set vip (a node takes over only when no host answers its ARP probe for the VIP) or cluster.fence (a command that powers off or isolates the peer)")
	}
	// The peer counts as lost only after cluster.timeout; a silence
	// shorter than that would confirm nothing.
	if h := c.Hooks.PeerLostAfter; h < cl.Timeout || h > time.Hour {
		bad("hooks.peer_lost_after %s: must be between cluster.timeout (%s) and 1h; a peer silent that long counts as down (with peer_lost_check passing), e.g. %s", h, cl.Timeout, DefaultPeerLostAfter)
	}
	if cl.Witness != "" && net.ParseIP(cl.Witness) == nil {
		bad("cluster.witness %q: want an IP address (e.g. the default gateway)", cl.Witness)
	}
	if v := c.VIP; v != nil {
		p, err := netip.ParsePrefix(v.Address)
		if err != nil || !p.Addr().Is4() {
			bad("vip.address %q: want an IPv4 address with its prefix length, e.g. 10.250.0.100/24", v.Address)
		}
		if v.Interface == "" {
			bad("vip.interface: name the interface that carries the VIP, e.g. eth0")
		}
		if err == nil {
			// The VIP is an address of its own: on a node's address,
			// releasing it removes the node's address, and the ARP
			// probe finds the peer's answering for ever (no takeover).
			node := map[netip.Addr]string{}
			for i, n := range cl.Networks {
				if a, err := netip.ParseAddr(n.Local); err == nil {
					node[a.Unmap()] = fmt.Sprintf("this node's own (cluster.networks[%d].local)", i)
				}
				if a, err := netip.ParseAddr(n.Peer); err == nil {
					node[a.Unmap()] = fmt.Sprintf("the peer's own (cluster.networks[%d].peer)", i)
				}
			}
			for _, f := range []struct{ field, addr, whose string }{{"listen", c.Listen, "this node's own (listen)"}, {"peer", c.Peer, "the peer's own (peer)"}} {
				if h, _, err := net.SplitHostPort(f.addr); err == nil {
					if a, err := netip.ParseAddr(h); err == nil {
						node[a.Unmap()] = f.whose
					}
				}
			}
			if whose, ok := node[p.Addr().Unmap()]; ok {
				bad("vip.address %q: %s address: pick an address no host uses on that network", v.Address, whose)
			}
		}
	}
	if c.Pprof && c.Metrics == "off" {
		bad("pprof: true serves the profiles on the metrics address: set metrics: host:port (e.g. %s)", DefaultMetrics)
	}
	if c.Metrics != "off" {
		if _, port, err := net.SplitHostPort(c.Metrics); err != nil || port == "" {
			bad("metrics %q: want host:port (e.g. %s) or off", c.Metrics, DefaultMetrics)
		}
	}
	names := map[string]int{}
	svcMod := 0 // as for directories
	for _, s := range c.Services {
		if s.from != "" {
			svcMod++
		}
	}
	for i, s := range c.Services {
		if !nameRE.MatchString(s.Name) {
			bad("services[%d].name %q: must be 1-63 letters, digits, '.', '_' or '-'", i-svcMod, s.Name)
		}
		if j, dup := names[s.Name]; dup {
			if c.Services[j].from != "" {
				bad("services[%d].name %q: already used by the %s module's service: pick another name", i-svcMod, s.Name, c.Services[j].from)
			} else {
				bad("services[%d].name %q: already used by services[%d]", i-svcMod, s.Name, j-svcMod)
			}
		}
		names[s.Name] = i
		if strings.TrimSpace(s.Start) == "" {
			bad("services[%d].start: the command that runs the service is missing", i-svcMod)
		}
		checks := 0
		for _, ch := range []string{s.CheckTCP, s.CheckCommand, s.CheckNFS} {
			if ch != "" {
				checks++
			}
		}
		if checks > 1 {
			bad("services[%d]: more than one of check_tcp, check_command and check_nfs: keep one", i-svcMod)
		}
		for _, f := range []struct{ field, addr string }{{"check_tcp", s.CheckTCP}, {"check_nfs", s.CheckNFS}} {
			if f.addr == "" {
				continue
			}
			if !hostPort(f.addr) {
				bad("services[%d].%s %q: want host:port with a port 1-65535", i-svcMod, f.field, f.addr)
			}
		}
		for _, d := range []struct {
			field string
			v     time.Duration
			eg    string
		}{{"check_interval", s.CheckInterval, "2s"}, {"start_timeout", s.StartTimeout, "30s"}, {"stop_timeout", s.StopTimeout, "10s"}} {
			if d.v <= 0 {
				bad("services[%d].%s %s: must be positive (e.g. %s)", i-svcMod, d.field, d.v, d.eg)
			}
		}
		if *s.Restarts < 0 {
			bad("services[%d].restarts %d: must be 0 or more", i-svcMod, *s.Restarts)
		}
	}
}

// k3sPorts refuses a k3s port that another server of the node listens on:
// the second server cannot bind, its service restarts, then fails over,
// and the peer meets the same clash.
func (c *Config) k3sPorts(bad func(string, ...any)) {
	k := c.K3S
	if k.MySQLPort == k.NFSPort {
		bad("k3s.mysql_port %d: also k3s.nfs_port: pick another port for one of them", k.MySQLPort)
	}
	// Both listen on every address (mariadbd --bind-address=0.0.0.0).
	_, lp, _ := net.SplitHostPort(c.Listen)
	for _, f := range []struct {
		field string
		port  int
	}{{"mysql_port", k.MySQLPort}, {"nfs_port", k.NFSPort}} {
		if strconv.Itoa(f.port) == lp {
			bad("k3s.%s %d: also the port of listen (%s): pick another port", f.field, f.port, c.Listen)
		}
	}
}

// hostPort reports whether addr is host:port with a port 1-65535 (a
// number).
func hostPort(addr string) bool { return hostPortFrom(addr, 1) }

// hostPortFrom reports whether addr is host:port with a port from min to
// 65535 (listen may take 0: any free port, for tests).
func hostPortFrom(addr string, min int) bool {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	n, err := strconv.Atoi(port)
	return err == nil && n >= min && n <= 65535
}

// within reports whether path is dir or lies under it, lexically and
// with the symbolic links of both resolved (as far as they exist).
func within(path, dir string) bool {
	under := func(p, d string) bool {
		p, d = filepath.Clean(p), filepath.Clean(d)
		return p == d || d == "/" || strings.HasPrefix(p, d+"/")
	}
	return under(path, dir) || under(resolved(path), resolved(dir))
}

// resolved is path with the symbolic links of its longest existing
// prefix resolved.
func resolved(path string) string {
	path = filepath.Clean(path)
	rest := ""
	for p := path; ; p = filepath.Dir(p) {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Join(r, rest)
		}
		if p == "/" || p == "." {
			return path
		}
		rest = filepath.Join(filepath.Base(p), rest)
	}
}

// EpochID is this node's number in the epochs it draws (cluster.Machine
// ID): 1 for the node whose lowest heartbeat address is the lower of the
// two nodes', 2 for the other. Each node's file holds both nodes'
// addresses (cluster.networks, local and peer; Validate refuses an
// address on both sides), so the two nodes pick different numbers
// whatever the order of their networks.
func (c *Config) EpochID() uint8 {
	var local, peer netip.Addr
	for _, n := range c.Cluster.Networks {
		l, _ := netip.ParseAddr(n.Local)
		p, _ := netip.ParseAddr(n.Peer)
		if l = l.Unmap(); !local.IsValid() || l.Less(local) {
			local = l
		}
		if p = p.Unmap(); !peer.IsValid() || p.Less(peer) {
			peer = p
		}
	}
	if local.Less(peer) {
		return 1
	}
	return 2
}

func unwrapPathErr(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// MinKeySize is the shortest cluster key accepted, in bytes: the key is
// all that keeps strangers from writing into the replicas.
const MinKeySize = 16

// ReadKey returns the cluster key: key, or the content of key_file
// without surrounding white space.
func (c *Config) ReadKey() ([]byte, error) {
	if c.Key != "" {
		if len(c.Key) < MinKeySize {
			return nil, fmt.Errorf("key: %d bytes is too short: want at least %d (`head -c 32 /dev/urandom | base64` prints a good key; the same on both nodes)", len(c.Key), MinKeySize)
		}
		return []byte(c.Key), nil
	}
	b, err := readSecret("key_file", c.KeyFile, ": create it with "+newKeyCommand(c.KeyFile)+" and copy it to the other node, or let `duet init k3s` write one")
	if err != nil {
		return nil, err
	}
	k := bytes.TrimSpace(b)
	if len(k) < MinKeySize {
		return nil, fmt.Errorf("key_file %q: key of %d bytes is too short (want at least %d): write a new one with %s and copy it to the other node",
			c.KeyFile, len(k), MinKeySize, newKeyCommand(c.KeyFile))
	}
	return k, nil
}

// newKeyCommand is the shell command that writes a new cluster key to path.
func newKeyCommand(path string) string {
	return fmt.Sprintf("`head -c 32 /dev/urandom | base64 > %s; chmod 600 %s`", shq(path), shq(path))
}

// ReadKeys returns the cluster keys this node trusts: the key, then the
// previous key if one is set (a rotation in progress).
func (c *Config) ReadKeys() ([][]byte, error) {
	k, err := c.ReadKey()
	if err != nil {
		return nil, err
	}
	prev, err := c.readPrevious(k)
	if err != nil || prev == nil {
		return [][]byte{k}, err
	}
	return [][]byte{k, prev}, nil
}

// readPrevious returns the previous key (nil: none), checked against the
// current one, k.
func (c *Config) readPrevious(k []byte) ([]byte, error) {
	var prev []byte
	switch {
	case c.PreviousKey != "":
		if len(c.PreviousKey) < MinKeySize {
			return nil, fmt.Errorf("previous_key: %d bytes is too short: want at least %d", len(c.PreviousKey), MinKeySize)
		}
		prev = []byte(c.PreviousKey)
	case c.PreviousKeyFile != "":
		b, err := readSecret("previous_key_file", c.PreviousKeyFile, "")
		if err != nil {
			return nil, err
		}
		if prev = bytes.TrimSpace(b); len(prev) < MinKeySize {
			return nil, fmt.Errorf("previous_key_file %q: key of %d bytes is too short (want at least %d)", c.PreviousKeyFile, len(prev), MinKeySize)
		}
	default:
		return nil, nil
	}
	if bytes.Equal(prev, k) {
		return nil, errors.New("previous_key: the same as key: remove it (a rotation adds the new key as key, the old one as previous_key)")
	}
	return prev, nil
}

// readSecret reads the file of a secret (field names its setting; hint, if
// any, follows a failure to read it, but for a lack of permission, which
// only running as root mends). Like ssh with a private key, it
// refuses a file that group or others may read or write: whoever can read
// it can write into the replicas or the database, whoever can write it can
// change the secret.
func readSecret(field, path, hint string) ([]byte, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrPermission) {
		return nil, fmt.Errorf("%s %q: %v: duet reads it as root: run this as root", field, path, unwrapPathErr(err))
	}
	if err != nil {
		return nil, fmt.Errorf("%s %q: %v%s", field, path, unwrapPathErr(err), hint)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s %q: %v", field, path, unwrapPathErr(err))
	}
	if m := st.Mode().Perm(); m&0o077 != 0 {
		return nil, fmt.Errorf("%s %q: mode %04o lets group or others read or write this secret: run chmod 600 %s", field, path, m, shq(path))
	}
	b, err := io.ReadAll(f)
	if err != nil {
		return nil, fmt.Errorf("%s %q: %v", field, path, unwrapPathErr(err))
	}
	return b, nil
}

// PeerAddrs are the peer's addresses this file names: the host of peer
// and each network's peer address, unmapped, without repeats. The
// replication listener keeps handshake places for them.
func (c *Config) PeerAddrs() []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return // a name, or nothing: no place kept for it
		}
		if a = a.Unmap(); !slices.Contains(out, a) {
			out = append(out, a)
		}
	}
	if h, _, err := net.SplitHostPort(c.Peer); err == nil {
		add(h)
	}
	for _, n := range c.Cluster.Networks {
		add(n.Peer)
	}
	return out
}
