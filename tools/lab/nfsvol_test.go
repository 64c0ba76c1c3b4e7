package lab

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	"github.com/duet-ha/duet/tools/lab/faultnet"
)

// nfsVolume is what a pod's hard NFS mount does across a failover: it
// mounts the export once, through the VIP from the client namespace, and
// keeps using the same file and directory handles whichever node serves.
// Each request creates a numbered file in the volume's directory, writes
// it UNSTABLE and COMMITs it, and appends its number to one long-lived
// file, committed too: acknowledged means committed. A stale handle (the
// server does not know a handle it gave out before the move) is counted
// and fails the test.
type nfsVolume struct {
	c *nfsclient.Client

	mu      sync.Mutex
	dir     []byte // the volume's directory, made at the mount
	log     []byte // "acks": one line per acknowledged request
	logSize uint64
	stale   int
	staleAt []string
	// resent counts the writes sent again because their COMMIT came
	// from a server that had not taken them (another verifier).
	resent int
	// What the last read back found: each file's content, and the log's
	// lines in order (to tell, for a missing entry, which part is gone).
	seenFiles map[int]string
	seenLog   []string
	// read counts the files the last read back read.
	read int
}

// nfsVIP is the NFS service's address through the VIP.
var nfsVIP = net.JoinHostPort(vipAddr, "2049")

func newNFSVolume() *nfsVolume {
	c := nfsclient.New(func(ctx context.Context) (net.Conn, error) {
		var conn net.Conn
		err := faultnet.InNetns("duet-c", func() error {
			// From a privileged port, as a Linux mount: duet's
			// server refuses others.
			var err error
			conn, err = nfsclient.DialReserved(ctx, net.Dialer{}, "tcp", nfsVIP)
			return err
		})
		return conn, err
	})
	// One attempt on a connection to a dead server is abandoned after
	// 2 s; the call is resent on a new connection, to whoever serves.
	c.Timeout = 2 * time.Second
	return &nfsVolume{c: c}
}

// note counts a stale handle; it returns err.
func (v *nfsVolume) note(err error, what string) error {
	if nfsclient.IsStale(err) {
		v.stale++
		v.staleAt = append(v.staleAt, fmt.Sprintf("%s at %s: %v", what, time.Now().Format("15:04:05.000"), err))
	}
	return err
}

// mount mounts the export and makes the volume's directory and its log,
// once; later calls keep what the first got.
func (v *nfsVolume) mount(ctx context.Context) error {
	if v.dir != nil {
		return nil
	}
	root, err := v.c.Mount(ctx, "/")
	if err != nil {
		return v.note(err, "MNT")
	}
	dir, err := v.c.Mkdir(ctx, root, "vol", 0o755)
	if st, ok := nfsclient.StatusOf(err); ok && st == nfsclient.StatusExist {
		// Made by an attempt whose reply was lost.
		dir, err = v.c.Lookup(ctx, root, "vol")
	}
	if err != nil {
		return v.note(err, "MKDIR vol")
	}
	log, err := v.c.Create(ctx, dir, "acks", nfsclient.Unchecked, 0o644)
	if err != nil {
		return v.note(err, "CREATE acks")
	}
	v.dir, v.log = dir, log
	return nil
}

// op is one request: file n, then its line in the log.
func (v *nfsVolume) op(ctx context.Context, n int) error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if err := v.mount(ctx); err != nil {
		return err
	}
	name := fmt.Sprintf("f-%06d", n)
	fh, err := v.c.Create(ctx, v.dir, name, nfsclient.Guarded, 0o644)
	if st, ok := nfsclient.StatusOf(err); ok && st == nfsclient.StatusExist {
		// This request's own create, resent after a lost reply (each
		// name is created once).
		fh, err = v.c.Lookup(ctx, v.dir, name)
	}
	if err != nil {
		return v.note(err, "CREATE "+name)
	}
	if err := v.writeCommitted(ctx, fh, 0, []byte(fmt.Sprintf("file %d\n", n)), name); err != nil {
		return err
	}
	// The log's lines are fixed-width: an append whose reply was lost
	// and that the next request overwrites leaves no torn line.
	line := fmt.Sprintf("%09d\n", n)
	if err := v.writeCommitted(ctx, v.log, v.logSize, []byte(line), "acks"); err != nil {
		return err
	}
	v.logSize += uint64(len(line))
	return nil
}

// writeCommitted writes data UNSTABLE and COMMITs it, as a Linux client
// does: a COMMIT whose verifier is not the WRITE's comes from a server
// that did not take the WRITE (a failover in between), which may have
// lost the bytes, so they are written and committed again.
func (v *nfsVolume) writeCommitted(ctx context.Context, fh []byte, off uint64, data []byte, name string) error {
	for {
		w, err := v.c.Write(ctx, fh, off, data, nfsclient.Unstable)
		if err != nil {
			return v.note(err, "WRITE "+name)
		}
		verf, err := v.c.Commit(ctx, fh)
		if err != nil {
			return v.note(err, "COMMIT "+name)
		}
		if verf == w.Verifier || w.Committed == nfsclient.FileSync {
			return nil
		}
		v.resent++
	}
}

// present reads back, through the handles kept since the mount, which
// requests left both their file (with its content) and their log line.
func (v *nfsVolume) present(ctx context.Context) (map[int]bool, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	got := map[int]bool{}
	v.read = 0
	if v.dir == nil {
		return got, nil
	}
	ents, err := v.c.ReadDirPlus(ctx, v.dir)
	if err != nil {
		return nil, v.note(err, "READDIRPLUS vol")
	}
	files := map[int]bool{}
	seen := map[int]string{}
	v.seenFiles = seen
	for _, e := range ents {
		num, ok := strings.CutPrefix(e.Name, "f-")
		if !ok {
			continue
		}
		n, _ := strconv.Atoi(strings.TrimLeft(num, "0"))
		data, _, err := v.c.Read(ctx, e.Handle, 0, 64)
		if err != nil {
			return nil, v.note(err, "READ "+e.Name)
		}
		v.read++
		files[n] = string(data) == fmt.Sprintf("file %d\n", n)
		seen[n] = string(data)
	}
	var log bytes.Buffer
	for off := uint64(0); ; {
		data, eof, err := v.c.Read(ctx, v.log, off, 1<<20)
		if err != nil {
			return nil, v.note(err, "READ acks")
		}
		log.Write(data)
		off += uint64(len(data))
		if eof || len(data) == 0 {
			break
		}
	}
	v.seenLog = strings.Fields(log.String())
	for _, f := range v.seenLog {
		n, err := strconv.Atoi(strings.TrimLeft(f, "0"))
		if err == nil && files[n] {
			got[n] = true
		}
	}
	return got, nil
}

// explain says, for an acknowledged entry n found missing, what the last
// read back saw of it: its file, and its line in the log with the lines
// around where it should be.
func (v *nfsVolume) explain(n int) string {
	v.mu.Lock()
	defer v.mu.Unlock()
	file := "absent"
	if c, ok := v.seenFiles[n]; ok {
		file = fmt.Sprintf("content %q", c)
	}
	line := fmt.Sprintf("%09d", n)
	at := -1
	for i, l := range v.seenLog {
		if l == line {
			at = i
			break
		}
	}
	if at >= 0 {
		return fmt.Sprintf("entry %d: file %s; log line %d present", n, file, at)
	}
	// Where it would be: after the last line numbered below n.
	pos := 0
	for i, l := range v.seenLog {
		if k, err := strconv.Atoi(strings.TrimLeft(l, "0")); err == nil && k < n {
			pos = i + 1
		}
	}
	lo, hi := max(0, pos-4), min(len(v.seenLog), pos+4)
	return fmt.Sprintf("entry %d: file %s; no log line (log lines %d..%d of %d: %s)", n, file, lo, hi, len(v.seenLog), strings.Join(v.seenLog[lo:hi], " "))
}

// staleErr reports the stale handles seen so far.
func (v *nfsVolume) staleErr() error {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.stale == 0 {
		return nil
	}
	return fmt.Errorf("%d stale file handles through handles kept since the mount: %s", v.stale, strings.Join(first(v.staleAt, 5), "; "))
}

// nfsClient is the k3s lab's NFS client: a volume mounted once.
func nfsClient(t *testing.T, l *Lab) *client {
	v := newNFSVolume()
	t.Cleanup(func() { v.c.Close() })
	return &client{name: "nfs", l: l, op: v.op, explain: v.explain, have: func(t *testing.T) map[int]bool {
		// Every file is read back, one call at a time (about 1 ms each
		// here): a long campaign's volume holds thousands.
		v.mu.Lock()
		entries := v.logSize / 10 // the log's lines are 10 bytes
		v.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute+time.Duration(entries)*10*time.Millisecond)
		defer cancel()
		start := time.Now()
		got, err := v.present(ctx)
		v.mu.Lock()
		read := v.read
		v.mu.Unlock()
		if err != nil {
			t.Fatalf("reading the NFS volume back through the VIP: %v (%d files read in %v)", err, read, time.Since(start).Round(time.Millisecond))
		}
		t.Logf("nfs client: %d files read back in %v", read, time.Since(start).Round(time.Millisecond))
		if err := v.staleErr(); err != nil {
			t.Error(err)
		}
		v.mu.Lock()
		t.Logf("nfs client: %d writes sent again so far, their COMMIT answered by a server with another write verifier", v.resent)
		v.mu.Unlock()
		return got
	}}
}
