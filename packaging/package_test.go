// Package packaging tests what `make package` builds: the files an operator
// installs, and maintainer scripts that never start the daemon.
package packaging

import (
	"bufio"
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// version is what the test stamps: a commit, as git describe gives it
// before the first release tag. It starts with a letter, which dpkg refuses
// as a package version.
const version = "abc1234-dirty"

func TestPackage(t *testing.T) {
	for _, tool := range []string{"make", "dpkg-deb"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian: apt-get install make dpkg): cannot build and inspect the .deb", tool)
		}
	}
	tmp := t.TempDir()
	dist := filepath.Join(tmp, "dist")
	mk := exec.Command("make", "--no-print-directory", "package",
		"DIST="+dist, "BIN="+filepath.Join(tmp, "duet"), "VERSION="+version)
	mk.Dir = ".."
	if out, err := mk.CombinedOutput(); err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(dist, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("make package wrote %q, want one .deb in %s", debs, dist)
	}
	deb := debs[0]

	t.Run("control", func(t *testing.T) { checkControl(t, deb) })
	t.Run("contents", func(t *testing.T) { checkContents(t, deb) })
	t.Run("installed", func(t *testing.T) { checkInstalled(t, deb) })
	t.Run("scripts", func(t *testing.T) { checkScripts(t, deb) })
	t.Run("rpm", func(t *testing.T) { checkRPM(t, dist) })
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func checkControl(t *testing.T, deb string) {
	fields := map[string]string{}
	for line := range strings.Lines(run(t, "dpkg-deb", "--field", deb)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ": "); ok && !strings.HasPrefix(line, " ") {
			fields[k] = v
		}
	}
	for k, want := range map[string]string{
		"Package": "duet", "Architecture": "amd64", "Version": "0.0.0~git" + version,
		// Static binary, no program it runs: no dependency.
		"Depends": "", "Recommends": "", "Suggests": "mariadb-server, nfs-ganesha-vfs",
	} {
		if fields[k] != want {
			t.Errorf("control field %s: %q, want %q", k, fields[k], want)
		}
	}
	if fields["Description"] == "" {
		t.Error("control: no Description")
	}
}

// entry is one line of dpkg-deb --contents.
type entry struct{ mode, owner string }

func checkContents(t *testing.T, deb string) {
	got := map[string]entry{}
	for line := range strings.Lines(run(t, "dpkg-deb", "--contents", deb)) {
		f := strings.Fields(line)
		if len(f) < 6 {
			t.Fatalf("dpkg-deb --contents: unexpected line %q", line)
		}
		got[strings.TrimSuffix(strings.TrimPrefix(f[5], "."), "/")] = entry{f[0], f[1]}
	}
	want := map[string]string{
		"/usr/bin/duet":                    "-rwxr-xr-x",
		"/lib/systemd/system/duet.service": "-rw-r--r--",
		// duet init k3s writes the configuration, key and password here.
		"/etc/duet":                     "drwx------",
		"/usr/share/doc/duet/README.md": "-rw-r--r--",
	}
	for pattern, dir := range map[string]string{
		"../deploy/prometheus/*.yml": "/usr/share/duet/prometheus/",
		"../deploy/grafana/*.json":   "/usr/share/duet/grafana/",
		"../docs/*.md":               "/usr/share/doc/duet/",
	} {
		files, _ := filepath.Glob(pattern)
		if len(files) == 0 {
			t.Fatalf("no %s in the repository", pattern)
		}
		for _, f := range files {
			want[dir+filepath.Base(f)] = "-rw-r--r--"
		}
	}
	for path, mode := range want {
		if e, ok := got[path]; !ok {
			t.Errorf("%s: not in the package", path)
		} else if e.mode != mode || e.owner != "root/root" {
			t.Errorf("%s: %s %s, want %s root/root", path, e.mode, e.owner, mode)
		}
	}
	for path := range got {
		// A file under /etc would be a conffile that duet init (and the
		// operator) must not find already there.
		if strings.HasPrefix(path, "/etc/") && path != "/etc/duet" {
			t.Errorf("%s: the package installs a file under /etc", path)
		}
	}
}

// checkInstalled unpacks the package into a scratch root and runs the
// binary there. As root it lets dpkg --root unpack it, which checks the
// control fields and the version as an install would, with its own
// database and log in the scratch root; the package has no preinst, so
// dpkg runs nothing.
func checkInstalled(t *testing.T, deb string) {
	root := t.TempDir()
	if os.Geteuid() == 0 {
		admin := filepath.Join(root, "var/lib/dpkg")
		for _, d := range []string{"updates", "info"} {
			if err := os.MkdirAll(filepath.Join(admin, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(admin, "status"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		run(t, "dpkg", "--root="+root, "--log="+filepath.Join(root, "dpkg.log"), "--unpack", deb)
	} else {
		t.Log("not root: dpkg --root --unpack skipped, the files are extracted with dpkg-deb -x")
		run(t, "dpkg-deb", "-x", deb, root)
	}
	if fi, err := os.Stat(filepath.Join(root, "etc/duet")); err != nil || fi.Mode() != os.ModeDir|0o700 {
		t.Errorf("/etc/duet after unpacking: %v %v, want a directory of mode 0700", fi.Mode(), err)
	}
	bin := filepath.Join(root, "usr/bin/duet")
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("/usr/bin/duet is dynamically linked (built with cgo): the package declares no libc dependency")
		}
	}
	if out := run(t, bin, "version"); !strings.HasPrefix(out, "duet "+version+" ") {
		t.Errorf("/usr/bin/duet version: %q, want the version make stamped (%s)", out, version)
	}
}

// allowedVerbs are the systemctl commands a maintainer script may run: an
// HA daemon must not start before it is configured on both nodes, nor
// restart on an upgrade while the operator has not moved the service away.
var allowedVerbs = []string{"daemon-reload", "is-active", "stop"}

var systemctlRE = regexp.MustCompile(`\bsystemctl((?:\s+-\S+)*)\s+([a-z-]+)`)

func checkScripts(t *testing.T, deb string) {
	ctrl := t.TempDir()
	run(t, "dpkg-deb", "--control", deb, ctrl)
	if _, err := os.Stat(filepath.Join(ctrl, "conffiles")); err == nil {
		t.Error("the package has conffiles: it should install no configuration")
	}
	if _, err := os.Stat(filepath.Join(ctrl, "preinst")); err == nil {
		t.Error("the package has a preinst: nothing needs one, and dpkg --root would run it")
	}
	script := func(name string) string { return filepath.Join(ctrl, name) }
	for _, name := range []string{"postinst", "prerm", "postrm"} {
		sc := bufio.NewScanner(strings.NewReader(readFile(t, script(name))))
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if strings.HasPrefix(line, "#") {
				continue
			}
			for _, m := range systemctlRE.FindAllStringSubmatch(line, -1) {
				if !slices.Contains(allowedVerbs, m[2]) {
					t.Errorf("%s runs systemctl %s: %q (allowed: %v)", name, m[2], line, allowedVerbs)
				}
			}
		}
	}

	if os.Geteuid() != 0 {
		t.Skip("not root: the scripts' runs need a mount namespace (unshare) to fake a running systemd")
	}
	if _, err := exec.LookPath("unshare"); err != nil {
		t.Skip("unshare not installed (util-linux): the scripts' runs need it to fake a running systemd")
	}
	// A fake systemctl logs its calls; duet.service is active unless
	// INACTIVE is set.
	fake := t.TempDir()
	if err := os.WriteFile(filepath.Join(fake, "systemctl"), []byte(`#!/bin/sh
echo "$*" >>"$SYSTEMCTL_LOG"
[ "$1" != is-active ] || [ -z "$INACTIVE" ]
`), 0o755); err != nil {
		t.Fatal(err)
	}
	// deb and rpm run the same scripts with different arguments (deb
	// prerm remove|upgrade|failed-upgrade, rpm %preun 0|1).
	for _, tc := range []struct {
		name, script string
		args         []string
		noSystemd    bool
		inactive     bool
		want         []string
	}{
		{name: "deb install", script: "postinst", args: []string{"configure", ""}, want: []string{"daemon-reload"}},
		{name: "deb upgrade, postinst", script: "postinst", args: []string{"configure", "0.0.0~gitold"}, want: []string{"daemon-reload"}},
		{name: "rpm install", script: "postinst", args: []string{"1"}, want: []string{"daemon-reload"}},
		{name: "rpm upgrade, %post", script: "postinst", args: []string{"2"}, want: []string{"daemon-reload"}},
		{name: "deb upgrade, prerm", script: "prerm", args: []string{"upgrade", "0.0.1"}},
		{name: "deb failed upgrade", script: "prerm", args: []string{"failed-upgrade", "0.0.1"}},
		{name: "rpm upgrade, %preun", script: "prerm", args: []string{"1"}},
		{name: "deb removal", script: "prerm", args: []string{"remove"}, want: []string{"is-active --quiet duet.service", "stop duet.service"}},
		{name: "rpm erase", script: "prerm", args: []string{"0"}, want: []string{"is-active --quiet duet.service", "stop duet.service"}},
		{name: "deb removal, stopped daemon", script: "prerm", args: []string{"remove"}, inactive: true, want: []string{"is-active --quiet duet.service"}},
		{name: "deb removal, postrm", script: "postrm", args: []string{"remove"}, want: []string{"daemon-reload"}},
		{name: "rpm upgrade, %postun", script: "postrm", args: []string{"1"}, want: []string{"daemon-reload"}},
		{name: "no systemd, install", script: "postinst", args: []string{"configure", ""}, noSystemd: true},
		{name: "no systemd, removal", script: "prerm", args: []string{"remove"}, noSystemd: true},
		{name: "no systemd, postrm", script: "postrm", args: []string{"remove"}, noSystemd: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := filepath.Join(t.TempDir(), "systemctl.log")
			// A private tmpfs on /run: /run/systemd/system says whether
			// systemd runs, whatever the host runs.
			setup := `mount -t tmpfs tmpfs /run && { [ -n "$NO_SYSTEMD" ] || mkdir -p /run/systemd/system; } && exec "$@"`
			cmd := exec.Command("unshare", append([]string{"--mount", "--propagation", "private",
				"sh", "-c", setup, "setup", script(tc.script)}, tc.args...)...)
			cmd.Env = append(os.Environ(), "PATH="+fake+":"+os.Getenv("PATH"), "SYSTEMCTL_LOG="+log)
			if tc.noSystemd {
				cmd.Env = append(cmd.Env, "NO_SYSTEMD=1")
			}
			if tc.inactive {
				cmd.Env = append(cmd.Env, "INACTIVE=1")
			}
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Fatalf("%s %q: %v\n%s", tc.script, tc.args, err, out)
			}
			calls, err := os.ReadFile(log)
			if err != nil && !os.IsNotExist(err) {
				t.Fatal(err)
			}
			var got []string
			for line := range strings.Lines(string(calls)) {
				got = append(got, strings.TrimSuffix(line, "\n"))
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("%s %q ran systemctl %q, want %q", tc.script, tc.args, got, tc.want)
			}
		})
	}
}

func checkRPM(t *testing.T, dist string) {
	rpms, _ := filepath.Glob(filepath.Join(dist, "*.rpm"))
	if len(rpms) != 1 {
		t.Fatalf("make package wrote %q, want one .rpm in %s", rpms, dist)
	}
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Skip("rpm not installed: the .rpm's contents are not checked")
	}
	files := strings.Fields(run(t, "rpm", "-qlp", rpms[0]))
	for _, f := range []string{"/usr/bin/duet", "/usr/lib/systemd/system/duet.service", "/etc/duet"} {
		if !slices.Contains(files, f) {
			t.Errorf("%s: not in the .rpm (%q)", f, files)
		}
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
