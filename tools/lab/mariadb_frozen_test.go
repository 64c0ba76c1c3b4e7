package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/barrier"
	"github.com/duet-ha/duet/pkg/config"
)

// A survivor starts MariaDB from a copy frozen at an arbitrary moment of
// the primary's MariaDB, as a power cut would freeze it; duet's copy is
// frozen when the primary's daemon dies. MariaDB's shutdown has a moment
// where that goes wrong: it closes its binary log (the "in use" flag
// cleared and synced) before InnoDB writes and flushes the commit records
// of the last transactions, which are prepared only until then. A copy
// frozen there holds a prepared transaction and a binary log that says no
// recovery is needed, and MariaDB refused to start on it ("Found 1
// prepared transactions! ... start server with --tc-heuristic-recover"):
// the fault campaign's kill-during-swap (the daemon killed while the swap
// stopped MariaDB) left the survivor without its datastore for good.
//
// Here MariaDB runs the k3s module's start script under duet's barrier,
// with clients inserting rows, and is asked to stop; the first durability
// call after the binary log's flag is cleared is never confirmed (the
// daemon gone), and the data directory is copied there. MariaDB must then
// start from the copy with the module's script, every acknowledged row in
// it.
func TestMariaDBStartsFromCopyFrozenInItsShutdown(t *testing.T) {
	tools := stackTools(t)
	duet := duetBinary(t)
	top := t.TempDir()
	pw := filepath.Join(top, "pw")
	must(t, os.WriteFile(pw, []byte(k3sPassword+"\n"), 0o600))
	// start returns the module's MariaDB start script for a node whose
	// directories are under top/name, and the server's socket.
	start := func(name string) (script, sock, mysqlDir string) {
		data := filepath.Join(top, name, "k3s")
		state := filepath.Join(top, name, "state")
		must(t, os.MkdirAll(filepath.Join(data, "mysql"), 0o755))
		must(t, os.MkdirAll(filepath.Join(data, "nfs"), 0o755))
		c, err := config.Parse([]byte(fmt.Sprintf(`node: nodeA
role: primary
listen: 10.250.0.1:7788
peer: 10.250.0.2:7788
key: "0123456789abcdef"
state_dir: %s
vip: {address: 10.250.0.100/24, interface: eth0}
module: k3s
k3s:
  data_dir: %s
  password_file: %s
  mysql_user: root
  mariadbd: %s
  mariadb_install_db: %s
  mysql_args: [--skip-networking]
`, state, data, pw, tools["mariadbd"], tools["mariadb-install-db"])))
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range c.Services {
			if s.Name == "mariadb" {
				return s.Start, filepath.Join(state, "k3s", "mysqld.sock"), filepath.Join(data, "mysql")
			}
		}
		t.Fatal("the k3s module made no mariadb service")
		return
	}
	script, sock, mysqlDir := start("a")
	var armed atomic.Bool
	frozen, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	wait := func(int32) error {
		if armed.Load() && binlogClosed(mysqlDir) {
			once.Do(func() { close(frozen) })
			<-release
			return errors.New("the daemon is gone")
		}
		return nil
	}
	var logA bytes.Buffer
	cmd, err := barrier.Start(duet, []string{"/bin/sh", "-c", script}, wait, nil, func(c *exec.Cmd) {
		c.Stdout, c.Stderr = &logA, &logA
		c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	})
	if err != nil {
		t.Fatal(err)
	}
	a := watch(cmd)
	defer func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-release:
		default:
			close(release)
		}
		<-a.done
	}()
	sql := func(ctx context.Context, sock, q string) (string, error) {
		out, err := exec.CommandContext(ctx, tools["mariadb"], "--no-defaults", "-S", sock, "-u", "root", "-N", "-B", "-e", q).CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	waitUp := func(sock string, p *watched, log *bytes.Buffer) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second)
		for {
			if _, err := sql(context.Background(), sock, "SELECT 1"); err == nil {
				return
			}
			select {
			case <-p.done:
				t.Fatalf("MariaDB exited before it answered (%v):\n%s", p.err, tail(log.Bytes(), 3000))
			default:
			}
			if time.Now().After(deadline) {
				t.Fatalf("MariaDB did not answer in 90 s:\n%s", tail(log.Bytes(), 3000))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitUp(sock, a, &logA)
	if out, err := sql(context.Background(), sock, "CREATE DATABASE t; CREATE TABLE t.a (id INT PRIMARY KEY) ENGINE=InnoDB"); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// Four clients insert rows one at a time, each acknowledged by its
	// client's exit status, until MariaDB goes.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var acked []int
	var clients sync.WaitGroup
	for c := range 4 {
		clients.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				id := c*1000000 + i
				if _, err := sql(ctx, sock, fmt.Sprintf("INSERT INTO t.a VALUES (%d)", id)); err != nil {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				mu.Lock()
				acked = append(acked, id)
				mu.Unlock()
			}
		})
	}
	time.Sleep(1500 * time.Millisecond)
	armed.Store(true)
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-frozen:
	case <-a.done:
		t.Fatalf("MariaDB stopped (%v) without a durability call after it closed its binary log:\n%s", a.err, tail(logA.Bytes(), 3000))
	case <-time.After(60 * time.Second):
		t.Fatalf("MariaDB did not close its binary log within 60 s of SIGTERM:\n%s", tail(logA.Bytes(), 3000))
	}
	cancel()
	clients.Wait()
	// The copy: what the peer holds when the daemon dies here.
	_, sockB, dirB := start("b")
	must(t, os.Remove(dirB))
	if out, err := exec.Command("cp", "-a", mysqlDir, dirB).CombinedOutput(); err != nil {
		t.Fatalf("copying the data directory: %v: %s", err, out)
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	close(release)
	<-a.done

	scriptB, _, _ := start("b")
	var logB bytes.Buffer
	cmdB := exec.Command("/bin/sh", "-c", scriptB)
	cmdB.Stdout, cmdB.Stderr = &logB, &logB
	cmdB.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmdB.Start(); err != nil {
		t.Fatal(err)
	}
	b := watch(cmdB)
	defer func() {
		syscall.Kill(-cmdB.Process.Pid, syscall.SIGKILL)
		<-b.done
	}()
	waitUp(sockB, b, &logB)
	// Frozen in the window, the copy holds what the last transactions
	// prepared and not their commits: otherwise this run tested nothing.
	if !strings.Contains(logB.String(), "in prepared state after recovery") {
		t.Errorf("the copy held no prepared transaction: frozen outside MariaDB's window, this run could not see the failure:\n%s", tail(logB.Bytes(), 3000))
	}
	out, err := sql(context.Background(), sockB, "SELECT id FROM t.a")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	have := map[int]bool{}
	for _, f := range strings.Fields(out) {
		n, _ := strconv.Atoi(f)
		have[n] = true
	}
	var missing []int
	for _, id := range acked {
		if !have[id] {
			missing = append(missing, id)
		}
	}
	if len(missing) > 0 {
		t.Errorf("%d of %d acknowledged rows missing from the copy's MariaDB: %v", len(missing), len(acked), missing)
	}
	t.Logf("%d rows acknowledged, all in the copy, which held a prepared transaction", len(acked))
}

// watched is a started command whose end is awaited once, here.
type watched struct {
	done chan struct{} // closed when it has exited; err is then set
	err  error
}

func watch(cmd *exec.Cmd) *watched {
	w := &watched{done: make(chan struct{})}
	go func() {
		w.err = cmd.Wait()
		close(w.done)
	}()
	return w
}

// binlogClosed says whether the last binary log of the MariaDB data
// directory dir has its "in use" flag cleared (byte 21: the flags of its
// format description event).
func binlogClosed(dir string) bool {
	idx, err := os.ReadFile(filepath.Join(dir, "binlog.index"))
	if err != nil {
		return false
	}
	lines := strings.Fields(string(idx))
	if len(lines) == 0 {
		return false
	}
	f, err := os.Open(filepath.Join(dir, filepath.Base(lines[len(lines)-1])))
	if err != nil {
		return false
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 21); err != nil {
		return false
	}
	return b[0]&1 == 0
}
