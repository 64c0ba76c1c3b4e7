package config

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// ModuleK3S is the module that makes K3S's datastore and persistent
// volumes highly available: MariaDB (the datastore, reached by K3S through
// kine), an NFS server for the volumes and, in the lab, kine itself.
const ModuleK3S = "k3s"

// K3S configures the k3s module. Every path and binary has a default;
// only the database password file must exist (`duet init k3s` writes it).
type K3S struct {
	// DataDir holds the replicated directories unless they are named one
	// by one below. Default /var/lib/duet-k3s.
	DataDir string `yaml:"data_dir"`
	// MySQLDir is MariaDB's data directory (replicated); default
	// <data_dir>/mysql. Initialised by the first primary when empty.
	MySQLDir string `yaml:"mysql_dir"`
	// NFSDir is the directory the NFS server exports (replicated); the
	// provisioner makes one subdirectory per volume. Default <data_dir>/nfs.
	NFSDir string `yaml:"nfs_dir"`
	// NFSStateDir keeps ganesha's client records (replicated, so a grace
	// period after failover lets clients reclaim); default
	// <data_dir>/nfs-state. Not used by duet's NFS server, which keeps no
	// lock state.
	NFSStateDir string `yaml:"nfs_state_dir"`
	// NFSServer is the NFS server the module runs: "duet" (the default:
	// NFSv3, with file handles kept in the export, so that clients keep
	// their mounts across failover, swap and failback; docs/DESIGN.md
	// §11) or "ganesha" (NFSv4 with the VFS FSAL: its handles carry the
	// node's inode numbers, so every client must remount after the stack
	// moves).
	NFSServer string `yaml:"nfs_server"`
	// DuetBin is the duet binary that runs duet's NFS server; default the
	// running one.
	DuetBin string `yaml:"duet_bin"`
	// NFSClients are the client networks duet's NFS server serves (CIDRs
	// or addresses); default the VIP's network, where the nodes and
	// agents are. "any" serves every client that reaches the VIP. Calls
	// act as the user their AUTH_SYS credential names, which is the
	// client host's word: serve only hosts you trust.
	NFSClients []string `yaml:"nfs_clients"`
	// NFSRootSquash maps a client's root to the anonymous user 65534
	// (default true; either server). The module then makes the export's
	// root directory, if root owns it, 65534's at each start, so that the
	// provisioner (root in its pod) can make the volumes' directories.
	// false lets a client's root act as root on the export.
	NFSRootSquash *bool `yaml:"nfs_root_squash"`
	// NFSInsecure lets the NFS server (either) take calls from
	// unprivileged source ports (1024 and above), which any user of a
	// client host may bind, so forge any uid from (default false: only
	// root's ports, as knfsd's `secure` export option; ganesha's
	// PrivilegedPort; a Linux mount uses one).
	NFSInsecure bool `yaml:"nfs_insecure"`

	// Database, User and PasswordFile are what K3S (or kine) logs in with.
	Database     string `yaml:"database"`
	User         string `yaml:"user"`
	PasswordFile string `yaml:"password_file"`
	// MySQLPort is MariaDB's TCP port (default 3306); MySQLUser the system
	// user mariadbd runs as (default mysql).
	MySQLPort   int      `yaml:"mysql_port"`
	MySQLUser   string   `yaml:"mysql_user"`
	MySQLArgs   []string `yaml:"mysql_args"`
	MariaDBD    string   `yaml:"mariadbd"`
	InstallDB   string   `yaml:"mariadb_install_db"`
	MySQLClient string   `yaml:"mariadb_client"`

	// NFSPort is the NFS server's port (default 2049; duet's server takes
	// NFS and MOUNT on it). For ganesha only: NFSPseudo the path clients
	// mount (default /export); NFSGrace the NFSv4 grace period after a
	// takeover, during which clients reclaim their locks and no new ones
	// are granted (default 0: none, see the docs; at most MaxNFSGrace).
	// Ganesha is its binary.
	NFSPort   int           `yaml:"nfs_port"`
	NFSPseudo string        `yaml:"nfs_pseudo"`
	NFSGrace  time.Duration `yaml:"nfs_grace"`
	Ganesha   string        `yaml:"ganesha"`

	// Kine, when set, runs kine (the etcd API over MariaDB) on the primary
	// at this address, e.g. 0.0.0.0:2379. On real nodes K3S embeds kine
	// and connects to MariaDB itself: leave it empty.
	Kine    string `yaml:"kine"`
	KineBin string `yaml:"kine_bin"`
	Etcdctl string `yaml:"etcdctl"`

	// Kubectl runs kubectl (default "k3s kubectl"); "off" leaves
	// Kubernetes alone. Once a lost peer is confirmed down (fenced, or
	// silent for hooks.peer_lost_after with its Kubernetes node NotReady)
	// the module taints that node out of service so that Kubernetes
	// deletes its pods and they restart here; the taint goes when the peer
	// is a mirror again.
	Kubectl string `yaml:"kubectl"`
	// PeerKubeNode is the peer's name in Kubernetes; default its duet
	// name in lower case, as K3S names a node after its hostname.
	PeerKubeNode string `yaml:"peer_kube_node"`
}

// K3S defaults.
const (
	DefaultK3SDataDir = "/var/lib/duet-k3s"
	DefaultMySQLPort  = 3306
	DefaultNFSPort    = 2049
	NFSServerDuet     = "duet"
	NFSServerGanesha  = "ganesha"
	OutOfServiceTaint = "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute"
	// MaxNFSGrace is the longest grace period ganesha accepts
	// (NFSV4.Grace_Period is 0-180 s): past it ganesha refuses its
	// configuration and the NFS service would not start on any takeover.
	MaxNFSGrace = 180 * time.Second
	// AnonID is the uid and gid a client's root acts as under root
	// squash: nobody and nogroup (duet nfs-serve's --anon-uid and
	// --anon-gid default).
	AnonID = 65534
)

var (
	sqlNameRE  = regexp.MustCompile(`^[A-Za-z0-9_]{1,32}$`)
	passwordRE = regexp.MustCompile(`^[A-Za-z0-9._~+-]{12,128}$`)
)

// File is a file duet writes before it starts the services (a module's
// generated configuration).
type File struct {
	Path    string
	Content string
}

func (k *K3S) defaults(c *Config) {
	if k.DataDir == "" {
		k.DataDir = DefaultK3SDataDir
	}
	def := func(p *string, v string) {
		if *p == "" {
			*p = v
		}
	}
	def(&k.MySQLDir, filepath.Join(k.DataDir, "mysql"))
	def(&k.NFSDir, filepath.Join(k.DataDir, "nfs"))
	def(&k.NFSStateDir, filepath.Join(k.DataDir, "nfs-state"))
	def(&k.Database, "kine")
	def(&k.User, "kine")
	def(&k.PasswordFile, "/etc/duet/k3s-db.password")
	def(&k.MySQLUser, "mysql")
	def(&k.MariaDBD, "mariadbd")
	def(&k.InstallDB, "mariadb-install-db")
	def(&k.MySQLClient, "mariadb")
	def(&k.NFSPseudo, "/export")
	def(&k.Ganesha, "ganesha.nfsd")
	def(&k.NFSServer, NFSServerDuet)
	if k.NFSRootSquash == nil {
		squash := true
		k.NFSRootSquash = &squash
	}
	if len(k.NFSClients) == 0 && c.VIP != nil {
		if p, err := netip.ParsePrefix(c.VIP.Address); err == nil {
			k.NFSClients = []string{p.Masked().String()}
		}
	}
	if k.DuetBin == "" {
		k.DuetBin = "duet"
		if self, err := os.Executable(); err == nil {
			k.DuetBin = self
		}
	}
	def(&k.KineBin, "kine")
	def(&k.Etcdctl, "etcdctl")
	def(&k.Kubectl, "k3s kubectl")
	if k.MySQLPort == 0 {
		k.MySQLPort = DefaultMySQLPort
	}
	if k.NFSPort == 0 {
		k.NFSPort = DefaultNFSPort
	}
}

func (k *K3S) validate(bad func(string, ...any)) {
	for field, p := range map[string]string{"data_dir": k.DataDir, "mysql_dir": k.MySQLDir, "nfs_dir": k.NFSDir,
		"nfs_state_dir": k.NFSStateDir, "password_file": k.PasswordFile} {
		if !filepath.IsAbs(p) {
			bad("k3s.%s %q: must be an absolute path", field, p)
		}
	}
	// These two go into ganesha's configuration between double quotes.
	for field, p := range map[string]string{"nfs_dir": k.NFSDir, "nfs_state_dir": k.NFSStateDir} {
		if k.NFSServer == NFSServerGanesha && (strings.ContainsAny(p, "\"\\") || strings.ContainsFunc(p, unicode.IsControl)) {
			bad("k3s.%s %q: the NFS server's configuration cannot hold a path with a double quote, a backslash or a control character", field, p)
		}
	}
	if !sqlNameRE.MatchString(k.Database) {
		bad("k3s.database %q: 1-32 letters, digits or '_'", k.Database)
	}
	if !sqlNameRE.MatchString(k.User) {
		bad("k3s.user %q: 1-32 letters, digits or '_'", k.User)
	}
	if !nameRE.MatchString(k.MySQLUser) {
		bad("k3s.mysql_user %q: a system user name", k.MySQLUser)
	}
	if _, err := k.Password(); err != nil {
		bad("%v", err)
	}
	for field, p := range map[string]int{"mysql_port": k.MySQLPort, "nfs_port": k.NFSPort} {
		if p < 1 || p > 65535 {
			bad("k3s.%s %d: must be 1-65535", field, p)
		}
	}
	switch k.NFSServer {
	case NFSServerDuet:
		if len(k.NFSClients) == 0 {
			bad("k3s.nfs_clients: name the client networks the NFS server serves (e.g. [192.168.10.0/24]), or [any]; the default, the VIP's network, needs a vip")
		}
		for _, n := range k.NFSClients {
			if n == "any" {
				if len(k.NFSClients) > 1 {
					bad("k3s.nfs_clients: \"any\" with other networks: keep one or the other")
				}
				continue
			}
			if _, err := netip.ParsePrefix(n); err != nil {
				if _, err := netip.ParseAddr(n); err != nil {
					bad("k3s.nfs_clients %q: want a CIDR such as 192.168.10.0/24, an address, or any", n)
				}
			}
		}
		if k.NFSGrace != 0 {
			bad("k3s.nfs_grace %s: only for nfs_server: ganesha (duet's NFS server keeps no lock state, so a takeover needs no grace period)", k.NFSGrace)
		}
	case NFSServerGanesha:
	default:
		bad("k3s.nfs_server %q: %q (NFSv3, handles that survive failover) or %q (NFSv4, clients remount after failover)", k.NFSServer, NFSServerDuet, NFSServerGanesha)
	}
	if !strings.HasPrefix(k.NFSPseudo, "/") || strings.ContainsAny(k.NFSPseudo, " \t\n\";{}") {
		bad("k3s.nfs_pseudo %q: an absolute path without spaces, quotes or braces, e.g. /export", k.NFSPseudo)
	}
	if k.NFSGrace < 0 || (k.NFSGrace > 0 && k.NFSGrace < 5*time.Second) || k.NFSGrace > MaxNFSGrace {
		bad("k3s.nfs_grace %s: 0 (no grace period) or between 5s and %.0fs (the most nfs-ganesha accepts)", k.NFSGrace, MaxNFSGrace.Seconds())
	}
	if k.Kine != "" {
		if _, port, err := net.SplitHostPort(k.Kine); err != nil || port == "" {
			bad("k3s.kine %q: want host:port to serve the etcd API on, e.g. 0.0.0.0:2379, or leave it empty", k.Kine)
		}
	}
	if k.PeerKubeNode != "" && !nameRE.MatchString(k.PeerKubeNode) {
		bad("k3s.peer_kube_node %q: a Kubernetes node name", k.PeerKubeNode)
	}
	for field, p := range map[string]string{"k3s.mysql_dir": k.MySQLDir, "k3s.nfs_dir": k.NFSDir, "k3s.nfs_state_dir": k.NFSStateDir} {
		for other, q := range map[string]string{"k3s.mysql_dir": k.MySQLDir, "k3s.nfs_dir": k.NFSDir, "k3s.nfs_state_dir": k.NFSStateDir} {
			if field < other && (p == q || strings.HasPrefix(p, q+"/") || strings.HasPrefix(q, p+"/")) {
				bad("%s %q and %s %q: must be separate directories", field, p, other, q)
			}
		}
	}
}

// Password reads the database password.
func (k *K3S) Password() (string, error) {
	b, err := readSecret("k3s.password_file", k.PasswordFile, " (`duet init k3s` writes one; the same file on both nodes)")
	if err != nil {
		return "", err
	}
	pw := strings.TrimSpace(string(b))
	if !passwordRE.MatchString(pw) {
		return "", fmt.Errorf("k3s.password_file %q: the password must be 12-128 letters, digits or . _ ~ + -", k.PasswordFile)
	}
	return pw, nil
}

// expand adds the module's replicated directories, services and hooks
// before the user's own, and the files they need.
func (k *K3S) expand(c *Config) {
	rep := []Replicate{
		{Name: "mysql", Path: k.MySQLDir, Mode: ModeSync, from: "k3s.mysql_dir"},
		{Name: "nfs", Path: k.NFSDir, Mode: ModeSync, from: "k3s.nfs_dir"},
	}
	if k.NFSServer == NFSServerGanesha {
		rep = append(rep, Replicate{Name: "nfs-state", Path: k.NFSStateDir, Mode: ModeSync, from: "k3s.nfs_state_dir"})
	}
	c.Replicate = append(rep, c.Replicate...)
	run := filepath.Join(c.StateDir, "k3s")
	local := func(port int) string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(port)) }
	// duet's NFS server runs as a service like the others, under the
	// barrier: each fsync it makes before a reply (a WRITE, a new name)
	// waits until the peer has the change.
	allow := ""
	for _, n := range k.NFSClients {
		if n != "any" {
			allow += " --allow " + shq(n)
		}
	}
	// With root squash, a client's root is the anonymous user: the
	// export's root, made by root (duet init), becomes that user's so
	// that the provisioner can make a directory per volume in it. An
	// owner someone chose is left alone.
	prepare, flags := "", ""
	if k.NFSInsecure {
		flags = " --insecure"
	}
	if *k.NFSRootSquash {
		prepare = fmt.Sprintf(`if [ "$(stat -c %%u %s)" = 0 ]; then chown %d:%d %s; fi && `, shq(k.NFSDir), AnonID, AnonID, shq(k.NFSDir))
	} else {
		flags += " --no-root-squash"
	}
	nfs := Service{Name: "nfs", Start: fmt.Sprintf("%sexec %s nfs-serve %s --listen %s%s%s",
		prepare, shq(k.DuetBin), shq(k.NFSDir), net.JoinHostPort("0.0.0.0", strconv.Itoa(k.NFSPort)), flags, allow),
		CheckNFS: local(k.NFSPort), StartTimeout: time.Minute, StopTimeout: 30 * time.Second}
	if k.NFSServer == NFSServerGanesha {
		ganeshaConf := filepath.Join(run, "ganesha.conf")
		c.Files = append(c.Files, File{Path: ganeshaConf, Content: k.ganeshaConfig()})
		nfs.Start = fmt.Sprintf("%smkdir -p %s && exec %s -F -f %s -L STDERR -p %s -N NIV_WARN",
			prepare, shq(filepath.Join(k.NFSStateDir, "recovery")), k.Ganesha, shq(ganeshaConf), shq(filepath.Join(run, "ganesha.pid")))
	}
	svcs := []Service{
		{Name: "mariadb", Start: k.mariadbStart(run), StartTimeout: 5 * time.Minute, StopTimeout: 60 * time.Second,
			CheckCommand: fmt.Sprintf("MYSQL_PWD=\"$(cat %s)\" %s --no-defaults --protocol=tcp -h 127.0.0.1 -P %d -u %s --connect-timeout=3 -N -e 'SELECT 1' %s",
				shq(k.PasswordFile), k.MySQLClient, k.MySQLPort, k.User, k.Database)},
		nfs,
	}
	if k.Kine != "" {
		_, port, _ := net.SplitHostPort(k.Kine)
		svcs = append(svcs, Service{Name: "kine",
			Start: fmt.Sprintf("KINE_ENDPOINT=\"mysql://%s:$(cat %s)@tcp(127.0.0.1:%d)/%s\" exec %s --listen-address %s --metrics-bind-address 0",
				k.User, shq(k.PasswordFile), k.MySQLPort, k.Database, k.KineBin, k.Kine),
			CheckCommand: fmt.Sprintf("ETCDCTL_API=3 %s --endpoints http://127.0.0.1:%s --dial-timeout 2s --command-timeout 3s get --limit 1 --keys-only /", k.Etcdctl, port),
			StartTimeout: time.Minute})
	}
	for i := range svcs {
		svcs[i].from = "k3s"
	}
	c.Services = append(svcs, c.Services...)
	if k.Kubectl != "off" {
		// K3S names a node after its hostname in lower case (nodeB
		// registers as nodeb): tainting "nodeB" would fail for good.
		node := `"$(printf %s "$DUET_PEER" | tr '[:upper:]' '[:lower:]')"`
		if k.PeerKubeNode != "" {
			node = shq(k.PeerKubeNode)
		}
		if c.Hooks.PeerLost == "" {
			c.Hooks.PeerLost = fmt.Sprintf("%s taint nodes %s %s --overwrite", k.Kubectl, node, OutOfServiceTaint)
		}
		if c.Hooks.PeerLostCheck == "" {
			// Kubernetes must answer and see the node NotReady: a node
			// it still sees Ready is running, and an API that does not
			// answer confirms nothing.
			c.Hooks.PeerLostCheck = fmt.Sprintf(`ready=$(%s get node %s -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}') || exit 1; `+
				`case $ready in False|Unknown) ;; *) echo "the Kubernetes node is Ready=$ready: not confirmed down" >&2; exit 1 ;; esac`,
				k.Kubectl, node)
		}
		if c.Hooks.PeerBack == "" {
			// Removing a taint that is not there is no error here.
			c.Hooks.PeerBack = fmt.Sprintf("out=$(%s taint nodes %s %s- 2>&1) || case $out in *'not found'*) ;; *) echo \"$out\" >&2; exit 1 ;; esac",
				k.Kubectl, node, strings.SplitN(OutOfServiceTaint, "=", 2)[0])
		}
	}
}

// mariadbStart is MariaDB's start script. Settings duet relies on: every
// commit fsyncs the redo log (innodb_flush_log_at_trx_commit=1) through
// fsync (innodb_flush_method=fsync: buffered writes that duet captures,
// and a durability call it waits on), the doublewrite buffer against torn
// pages, and the binary log, synced at every commit (sync_binlog=1), in
// the replicated data directory. kine needs no binlog, but without it
// InnoDB makes a commit visible to other clients before it flushes its
// log: a reader could see a write that a failover then lost, before the
// writer was told it was committed (the fault campaign's linearizability
// check found it: a get returned a put whose outcome was unknown, and
// after the takeover the key held the value before). With the binlog a
// commit is two-phase: the prepare is flushed and the binlog synced (each
// a durability call, so on the peer) before the commit makes the change
// visible, and crash recovery on the survivor commits every prepared
// transaction the binlog holds. It is kept an hour, in 16 MiB files.
func (k *K3S) mariadbStart(run string) string {
	d := shq(k.MySQLDir)
	scratch := shq(filepath.Join(k.MySQLDir, ".duet-init"))
	args := []string{"--no-defaults", "--datadir=" + d, "--user=" + k.MySQLUser,
		"--socket=" + shq(filepath.Join(run, "mysqld.sock")), "--pid-file=" + shq(filepath.Join(run, "mysqld.pid")),
		"--bind-address=0.0.0.0", fmt.Sprintf("--port=%d", k.MySQLPort), "--skip-name-resolve",
		"--innodb-flush-log-at-trx-commit=1", "--innodb-flush-method=fsync", "--innodb-doublewrite=1",
		"--log-bin=binlog", "--sync-binlog=1", "--binlog-expire-logs-seconds=3600", "--max-binlog-size=16M",
		"--innodb-log-file-size=48M"}
	for _, a := range k.MySQLArgs {
		args = append(args, shq(a))
	}
	// The password is checked to hold no quote; names are letters,
	// digits and '_'.
	sql := strings.Join([]string{`"FLUSH PRIVILEGES;"`,
		fmt.Sprintf("\"CREATE DATABASE IF NOT EXISTS \\`%s\\`;\"", k.Database),
		fmt.Sprintf("\"CREATE USER IF NOT EXISTS '%s'@'%%' IDENTIFIED BY '$pw';\"", k.User),
		fmt.Sprintf("\"GRANT ALL PRIVILEGES ON \\`%s\\`.* TO '%s'@'%%';\"", k.Database, k.User)}, " ")
	return strings.Join([]string{
		"set -e",
		fmt.Sprintf("mkdir -p %s", shq(run)),
		// A first start initialises an empty data directory in a scratch
		// directory moved into place when complete: a crash half-way
		// leaves only the scratch, redone at the next start.
		fmt.Sprintf("if [ ! -d %s/mysql ]; then", d),
		fmt.Sprintf("  echo 'duet k3s: initialising MariaDB in '%s >&2", d),
		fmt.Sprintf("  rm -rf %s && mkdir %s", scratch, scratch),
		fmt.Sprintf("  %s --no-defaults --datadir=%s --user=%s --auth-root-authentication-method=socket --skip-test-db --innodb-log-file-size=48M >&2",
			k.InstallDB, scratch, k.MySQLUser),
		fmt.Sprintf("  pw=$(cat %s)", shq(k.PasswordFile)),
		fmt.Sprintf("  printf '%%s\\n' %s | %s --no-defaults --datadir=%s --user=%s --bootstrap --skip-networking --innodb-log-file-size=48M >&2",
			sql, k.MariaDBD, scratch, k.MySQLUser),
		fmt.Sprintf("  for f in %s/* ; do mv \"$f\" %s/ ; done", scratch, d),
		fmt.Sprintf("  rmdir %s", scratch),
		"fi",
		// The data directory itself may have been made by root (duet
		// init); what is below it came with its owner from the peer.
		fmt.Sprintf("chown %s %s", k.MySQLUser, d),
		markBinlogInUse(d),
		fmt.Sprintf("exec %s %s", k.MariaDBD, strings.Join(args, " ")),
	}, "\n")
}

// markBinlogInUse is the start script's step that sets the "in use" flag
// of the last binary log (bit 0 of the format description event's flags,
// byte 21 of the file), so that MariaDB always runs its crash recovery:
// every prepared InnoDB transaction whose XID the binary log holds is
// committed, the others rolled back. A copy the survivor starts from may
// have been frozen anywhere, as by a power cut, and MariaDB's own
// shutdown has a window where that goes wrong: it closes the binary log
// (flag cleared, synced) before InnoDB writes and flushes the commit
// records of the last transactions, which until then are prepared only
// (strace of a standalone MariaDB 10.11 under load: 40 ms between the
// two). A copy frozen there, the primary's daemon killed during a swap's
// stop of MariaDB, holds a prepared transaction and a binary log that
// says no recovery is needed, and MariaDB refuses to start ("Found 1
// prepared transactions! ... start server with --tc-heuristic-recover"),
// leaving the cluster without its datastore. With the flag set it
// commits the transaction the binary log holds, as after any crash; a
// log closed cleanly with nothing prepared is scanned and nothing done.
// The event's checksum is computed with the flag cleared, so it still
// holds. Only a file that starts like a binary log (magic, a format
// description event) is written; a failure is reported, not fatal. The
// binary log is the one the module names (--log-bin=binlog): a
// --log-bin or --log-bin-index in k3s.mysql_args leaves this step
// without a file to mark.
func markBinlogInUse(d string) string {
	return strings.Join([]string{
		fmt.Sprintf("if [ -s %s/binlog.index ]; then", d),
		fmt.Sprintf("  last=$(tail -n 1 %s/binlog.index)", d),
		fmt.Sprintf("  case $last in /*) ;; *) last=%s/${last#./} ;; esac", d),
		`  if [ -f "$last" ] && [ "$(od -An -tx1 -N4 "$last" 2>/dev/null | tr -d ' \n')" = fe62696e ] &&`,
		`    [ "$(od -An -tx1 -j8 -N1 "$last" 2>/dev/null | tr -d ' \n')" = 0f ] && [ "$(od -An -tx1 -j21 -N1 "$last" 2>/dev/null | tr -d ' \n')" = 00 ]; then`,
		`    printf '\001' | dd of="$last" bs=1 seek=21 count=1 conv=notrunc status=none ||`,
		`      echo "duet k3s: could not mark $last in use: MariaDB may find prepared transactions it does not recover" >&2`,
		"  fi",
		"fi",
	}, "\n")
}

// ganeshaConfig exports NFSDir over NFSv4 with the VFS FSAL.
func (k *K3S) ganeshaConfig() string {
	squash := "Root_Squash"
	if !*k.NFSRootSquash {
		squash = "No_Root_Squash"
	}
	grace := "\tGraceless = true;\n"
	if k.NFSGrace > 0 {
		grace = fmt.Sprintf("\tGrace_Period = %d;\n", int(k.NFSGrace.Seconds()))
	}
	return fmt.Sprintf(`# Written by duet (k3s module) at each start: edit duet's config instead.
NFS_CORE_PARAM {
	Protocols = 4;
	NFS_Port = %d;
	Enable_NLM = false;
	Enable_RQUOTA = false;
}
NFSV4 {
%s	Lease_Lifetime = 10;
	RecoveryBackend = fs;
	RecoveryRoot = "%s";
}
NFS_KRB5 { Active_krb5 = false; }
EXPORT {
	Export_Id = 1;
	Path = "%s";
	Pseudo = "%s";
	Access_Type = RW;
	Squash = %s;
	Anonymous_Uid = %d;
	Anonymous_Gid = %d;
	SecType = sys;
	PrivilegedPort = %t;
	Protocols = 4;
	Transports = TCP;
	FSAL { Name = VFS; }
}
`, k.NFSPort, grace, filepath.Join(k.NFSStateDir, "recovery"), k.NFSDir, k.NFSPseudo, squash, AnonID, AnonID, !k.NFSInsecure)
}

// shq quotes s for sh.
func shq(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-=:") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
