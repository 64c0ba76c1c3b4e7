package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/pkg/capture"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/replica"
)

// auditRig is the audit's world: a real capture, a real primary and a
// real peer on an ext4 loop filesystem, records dispatched as a serving
// node does (from a review: with a drain that does nothing, the unit test
// of the audit passed, and the real capture reported a stuck mark in 50
// audits of 50 made right after a write).
type auditRig struct {
	n     *Node
	c     *capture.Capture
	p     *replica.Primary
	mount string
	src   string
	dst   string
}

func newAuditRig(t *testing.T) *auditRig {
	fs := loopfs.Make(t, "ext4", 256)
	var st syscall.Stat_t
	if err := syscall.Stat(fs.Mount, &st); err != nil {
		t.Fatal(err)
	}
	c, err := capture.Open(capture.Options{Devices: []uint64{st.Dev}})
	if err != nil {
		t.Fatal(err)
	}
	src := filepath.Join(fs.Mount, "src")
	os.MkdirAll(filepath.Join(src, "vol"), 0o755)
	os.MkdirAll(filepath.Join(fs.Mount, "outside"), 0o755)
	top := t.TempDir()
	dst := filepath.Join(top, "dst")
	os.Mkdir(dst, 0o755)
	lk, _ := peerlink.New(peerlink.Options{Node: "test", Keys: [][]byte{[]byte("0123456789abcdef")}, Plaintext: true})
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv := &replica.Server{Link: lk, StateDir: filepath.Join(top, "state"), Dirs: []replica.Dir{{Name: "data", Path: dst}}, Log: log}
	srv.SetAccept(true)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p, err := replica.NewPrimary(replica.Dir{Name: "data", Path: src}, ln.Addr().String(), lk, capture.KernelDev(st.Dev), log)
	if err != nil {
		t.Fatal(err)
	}
	n := testNode(t, t.TempDir())
	n.log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	n.exit = func(int) {}
	n.drained = sync.NewCond(&n.drainMu)
	ps := []*replica.Primary{p}
	n.cap, n.primaries = c, ps
	n.overflowTo.Store(&ps)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(3)
	go func() { defer wg.Done(); srv.Serve(ctx, ln) }()
	go func() { defer wg.Done(); n.dispatch(c, ps) }()
	go func() { defer wg.Done(); p.Run(ctx, kernel{n}) }()
	t.Cleanup(func() {
		cancel()
		n.stopReading(c)
		wg.Wait()
		srv.Close(10 * time.Second)
		p.Close()
		c.Close()
	})
	waitFor(t, "streaming", p.Streaming)
	return &auditRig{n: n, c: c, p: p, mount: fs.Mount, src: src, dst: dst}
}

func (r *auditRig) settle(t *testing.T) {
	waitFor(t, "settled", func() bool { return r.p.Status().InSync && r.p.Quiet() })
}

func (r *auditRig) audit(t *testing.T, ps []*replica.Primary) []capture.InodeKey {
	return r.n.auditMarksOnce(context.Background(), r.c, kernel{r.n}.Drain, ps)
}

func mustW(t *testing.T, path string, data []byte, flag int) {
	f, err := os.OpenFile(path, flag|os.O_WRONLY, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(data); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

// workload: the kinds of changes the BPF code handles differently.
func (r *auditRig) workload(t *testing.T, round int) {
	vol := filepath.Join(r.src, "vol")
	out := filepath.Join(r.mount, "outside")
	for i := 0; i < 10; i++ {
		mustW(t, filepath.Join(vol, fmt.Sprintf("f%d", i)), make([]byte, 3<<20), os.O_CREATE|os.O_TRUNC)
		mustW(t, filepath.Join(vol, fmt.Sprintf("f%d", i)), []byte("append\n"), os.O_APPEND)
		mustW(t, filepath.Join(out, fmt.Sprintf("o%d", i)), make([]byte, 1<<20), os.O_CREATE|os.O_TRUNC)
	}
	os.Truncate(filepath.Join(vol, "f1"), 1000)
	if f, err := os.OpenFile(filepath.Join(vol, "f2"), os.O_RDWR, 0); err == nil {
		unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 4096, 1<<20)
		unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 2<<20, 8192)
		f.Close()
	}
	// mmap shared, stored to, and written with write(2) while mapped.
	if f, err := os.OpenFile(filepath.Join(vol, "f3"), os.O_RDWR, 0); err == nil {
		m, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
		if err == nil {
			for i := 0; i < len(m); i += 8192 {
				m[i] = byte(round + 1)
			}
			f.WriteAt([]byte("while mapped"), 100)
			unix.Msync(m, unix.MS_SYNC)
			unix.Munmap(m)
		}
		f.Close()
	}
	// O_DIRECT
	if f, err := os.OpenFile(filepath.Join(vol, "f4"), os.O_RDWR|unix.O_DIRECT, 0); err == nil {
		buf, _ := unix.Mmap(-1, 0, 1<<16, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		buf[0] = byte(round)
		f.WriteAt(buf, 1<<16)
		unix.Munmap(buf)
		f.Close()
	}
	os.Rename(filepath.Join(vol, "f5"), filepath.Join(vol, fmt.Sprintf("g%d", round)))
	os.Remove(filepath.Join(vol, "f6"))
	os.Mkdir(filepath.Join(vol, fmt.Sprintf("d%d", round)), 0o755)
	os.Chmod(filepath.Join(vol, "f7"), 0o600)
	os.Rename(filepath.Join(out, "o1"), filepath.Join(vol, fmt.Sprintf("in%d", round))) // moved in
	os.Rename(filepath.Join(vol, "f8"), filepath.Join(out, fmt.Sprintf("moved%d", round)))
}

// TestAuditNoFalsePositive: settled after each kind of change the BPF code
// handles its own way (truncate, punch and zero range, a shared mapping
// stored to and written while mapped, O_DIRECT, renames, moves in and out
// of the tree, writes outside it), the audit finds nothing; nor while a
// slow writer writes now and then.
func TestAuditNoFalsePositive(t *testing.T) {
	r := newAuditRig(t)
	ps := []*replica.Primary{r.p}
	judged := 0
	for round := 0; round < 3; round++ {
		r.workload(t, round)
		r.settle(t)
		time.Sleep(50 * time.Millisecond)
		for i := 0; i < 5; i++ {
			a, ch, _ := r.c.Marks()
			if got := r.audit(t, ps); got != nil {
				t.Errorf("round %d: false positive %v (marks %v %v)", round, got, a, ch)
			}
			judged++
		}
	}
	if got := r.n.marksAudited.Load(); got < uint64(judged)/2 {
		t.Errorf("%d of %d audits on a settled tree found the capture quiet: the test judged next to nothing", got, judged)
	}
	// A slow writer: a write every 150 ms, audits in between.
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(150 * time.Millisecond):
			}
			mustW(t, filepath.Join(r.src, "vol", "slow"), []byte(fmt.Sprintf("%d\n", i)), os.O_CREATE|os.O_APPEND)
		}
	}()
	for i := 0; i < 30; i++ {
		if got := r.audit(t, ps); got != nil {
			t.Errorf("slow writer: false positive %v", got)
		}
	}
	close(stop)
	<-done
	t.Logf("%d audits on a settled tree; %d judged in all", judged, r.n.marksAudited.Load())
}

// TestAuditRepairsDirectory: a stuck attribute mark on a directory (what a
// resync cut at its start left, TestResyncCutAtStartLeavesMarksStuck) is
// found, and its repair ships a file created in the directory while the
// mark was stuck.
func TestAuditRepairsDirectory(t *testing.T) {
	r := newAuditRig(t)
	vol := filepath.Join(r.src, "vol")
	var st syscall.Stat_t
	syscall.Stat(vol, &st)
	if err := r.c.PlantAttrMark(capture.InodeKey{Dev: r.p.Dev, Ino: st.Ino}); err != nil {
		t.Fatal(err)
	}
	mustW(t, filepath.Join(vol, "late"), []byte("late\n"), os.O_CREATE)
	r.settle(t)
	time.Sleep(300 * time.Millisecond)
	if _, err := os.Stat(filepath.Join(r.dst, "vol", "late")); err == nil {
		t.Fatal("the peer has vol/late before the audit: the planted mark did not silence the directory, the test shows nothing")
	}
	var got []capture.InodeKey
	for i := 0; i < 20 && got == nil; i++ {
		got = r.audit(t, []*replica.Primary{r.p})
	}
	if len(got) != 1 || got[0].Ino != st.Ino {
		t.Fatalf("audit found %v, want vol (inode %d)", got, st.Ino)
	}
	waitFor(t, "vol/late on the peer after the repair", func() bool {
		_, err := os.Stat(filepath.Join(r.dst, "vol", "late"))
		return err == nil
	})
}

// TestAuditRightAfterWrites: an audit made right after a write, its
// record maybe still in the ring, finds nothing: the drain hands the
// record to the primary first (without it, 50 audits of 50 found the
// write's mark "stuck").
func TestAuditRightAfterWrites(t *testing.T) {
	r := newAuditRig(t)
	ps := []*replica.Primary{r.p}
	r.settle(t)
	for i := 0; i < 50; i++ {
		mustW(t, filepath.Join(r.src, "vol", fmt.Sprintf("n%d", i)), []byte("x\n"), os.O_CREATE)
		if got := r.audit(t, ps); got != nil {
			t.Fatalf("audit %d, right after a write: its mark taken for stuck: %v", i, got)
		}
		r.settle(t)
	}
}
