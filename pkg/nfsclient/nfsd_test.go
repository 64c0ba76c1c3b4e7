package nfsclient_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	"github.com/duet-ha/duet/pkg/nfsd"
)

// serve runs pkg/nfsd on dir at addr ("127.0.0.1:0": any port) until
// stop, which closes every connection as a failover does.
func serve(t *testing.T, addr, dir string) (string, func()) {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nfsd.Serve(ctx, l, dir, nfsd.Fsync{}, nfsd.Squash{}) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serving %s: %v", dir, err)
			}
		})
	}
	t.Cleanup(stop)
	return l.Addr().String(), stop
}

// must fails the test on err and returns v.
func must[T any](t *testing.T, what string) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		return v
	}
}

func ok(t *testing.T, what string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestHardMountAcrossServers stops the server, starts another on the same
// port with a copy of the export (as a failover behind a VIP does), and
// checks that a call made while no server answered waits for the new one
// and succeeds, and that the handles from before work there, on one new
// connection.
func TestHardMountAcrossServers(t *testing.T) {
	ctx := testCtx(t)
	a := t.TempDir()
	addr, stop := serve(t, "127.0.0.1:0", a)
	d := newDialer(addr)
	c := nfsclient.New(d.dial)
	defer c.Close()
	root := must[[]byte](t, "MNT /")(c.Mount(ctx, "/"))
	dir := must[[]byte](t, "MKDIR d")(c.Mkdir(ctx, root, "d", 0o755))
	f := must[[]byte](t, "CREATE d/f")(c.Create(ctx, dir, "f", nfsclient.Guarded, 0o644))
	must[nfsclient.WriteResult](t, "WRITE d/f")(c.Write(ctx, f, 0, []byte("before"), nfsclient.FileSync))
	stop()

	b := t.TempDir()
	if out, err := exec.Command("cp", "-a", a+"/.", b).CombinedOutput(); err != nil {
		t.Fatalf("copying the export: %v: %s", err, out)
	}
	type result struct {
		data []byte
		err  error
	}
	read := make(chan result, 1)
	go func() {
		data, _, err := c.Read(ctx, f, 0, 100)
		read <- result{data, err}
	}()
	// Refused twice: the call is waiting, not failed.
	for range 2 {
		select {
		case <-d.failed:
		case r := <-read:
			t.Fatalf("READ while no server listens returned %q, %v", r.data, r.err)
		case <-time.After(10 * time.Second):
			t.Fatal("the client did not redial in 10 s")
		}
	}
	serve(t, addr, b)
	select {
	case r := <-read:
		if r.err != nil || string(r.data) != "before" {
			t.Fatalf("READ across the restart: %q, %v, want %q", r.data, r.err, "before")
		}
	case <-time.After(20 * time.Second):
		t.Fatal("READ across the restart still waiting 20 s after the new server started")
	}
	must[nfsclient.WriteResult](t, "WRITE d/f on the new server")(c.Write(ctx, f, 6, []byte(" after"), nfsclient.FileSync))
	if got, _, err := c.Read(ctx, f, 0, 100); err != nil || string(got) != "before after" {
		t.Errorf("READ d/f on the new server: %q, %v", got, err)
	}
	if got, err := c.Lookup(ctx, dir, "f"); err != nil || !bytes.Equal(got, f) {
		t.Errorf("LOOKUP d/f on the new server: %x, %v, want the handle %x", got, err, f)
	}
	if at, err := c.Getattr(ctx, dir); err != nil || at.Type != nfsclient.TypeDir {
		t.Errorf("GETATTR d on the new server: %+v, %v", at, err)
	}
	if n := d.conns(); n != 2 {
		t.Errorf("%d connections, want one per server", n)
	}
}

// TestStatusErrors checks that refusals reach the caller as StatusErrors
// with the procedure and status, and a forged handle as STALE.
func TestStatusErrors(t *testing.T) {
	ctx := testCtx(t)
	addr, _ := serve(t, "127.0.0.1:0", t.TempDir())
	c := nfsclient.New(newDialer(addr).dial)
	defer c.Close()
	root := must[[]byte](t, "MNT /")(c.Mount(ctx, "/"))
	f := must[[]byte](t, "CREATE f")(c.Create(ctx, root, "f", nfsclient.Guarded, 0o644))
	forged := slices.Clone(f)
	forged[len(forged)-1] ^= 1
	for _, tc := range []struct {
		call func() error
		want string
	}{
		{func() error { _, err := c.Getattr(ctx, forged); return err }, "GETATTR: NFS3ERR_STALE (70)"},
		{func() error {
			_, err := c.Write(ctx, forged, 0, []byte("x"), nfsclient.Unstable)
			return err
		}, "WRITE: NFS3ERR_STALE (70)"},
		{func() error { _, err := c.Create(ctx, root, "f", nfsclient.Guarded, 0o644); return err }, "CREATE: NFS3ERR_EXIST (17)"},
		{func() error { return c.Remove(ctx, root, "nope") }, "REMOVE: NFS3ERR_NOENT (2)"},
		{func() error { _, err := c.Lookup(ctx, f, "x"); return err }, "LOOKUP: NFS3ERR_NOTDIR (20)"},
		{func() error { _, err := c.Mount(ctx, "/nope"); return err }, "MNT: MNT3ERR_NOENT (2)"},
	} {
		err := tc.call()
		var se *nfsclient.StatusError
		if !errors.As(err, &se) || err.Error() != tc.want {
			t.Errorf("%v, want a StatusError %q", err, tc.want)
			continue
		}
		if stale := se.Status == nfsclient.StatusStale; nfsclient.IsStale(err) != stale {
			t.Errorf("%v: IsStale says %v", err, !stale)
		}
	}
}

// TestProcedures checks each procedure's arguments and results against
// pkg/nfsd.
func TestProcedures(t *testing.T) {
	ctx := testCtx(t)
	addr, _ := serve(t, "127.0.0.1:0", t.TempDir())
	c := nfsclient.New(newDialer(addr).dial)
	defer c.Close()
	ok(t, "NULL", c.Null(ctx))
	root := must[[]byte](t, "MNT /")(c.Mount(ctx, "/"))
	d := must[[]byte](t, "MKDIR d")(c.Mkdir(ctx, root, "d", 0o750))
	f := must[[]byte](t, "CREATE f")(c.Create(ctx, d, "f", nfsclient.Unchecked, 0o640))

	w := must[nfsclient.WriteResult](t, "WRITE f")(c.Write(ctx, f, 0, []byte("hello world"), nfsclient.Unstable))
	if w.Count != 11 || w.Committed < nfsclient.Unstable || w.Committed > nfsclient.FileSync {
		t.Errorf("WRITE f: %+v", w)
	}
	if v := must[uint64](t, "COMMIT f")(c.Commit(ctx, f)); v != w.Verifier {
		t.Errorf("COMMIT f: verifier %#x, WRITE's was %#x (the server did not restart)", v, w.Verifier)
	}
	data, eof := must2(t, "READ f")(c.Read(ctx, f, 6, 100))
	if string(data) != "world" || !eof {
		t.Errorf("READ f from 6: %q, eof %v, want %q at the end", data, eof, "world")
	}
	if data, eof = must2(t, "READ f")(c.Read(ctx, f, 0, 5)); string(data) != "hello" || eof {
		t.Errorf("READ f, 5 bytes: %q, eof %v, want %q before the end", data, eof, "hello")
	}

	size, mode := uint64(5), uint32(0o600)
	ok(t, "SETATTR f", c.Setattr(ctx, f, nfsclient.SetAttr{Size: &size, Mode: &mode}))
	at := must[nfsclient.Attr](t, "GETATTR f")(c.Getattr(ctx, f))
	if at.Type != nfsclient.TypeReg || at.Size != 5 || at.Mode&0o7777 != 0o600 || at.Fileid == 0 || at.Mtime.IsZero() {
		t.Errorf("GETATTR f after SETATTR size 5, mode 0600: %+v", at)
	}
	if at := must[nfsclient.Attr](t, "GETATTR d")(c.Getattr(ctx, d)); at.Type != nfsclient.TypeDir || at.Mode&0o7777 != 0o750 {
		t.Errorf("GETATTR d made with mode 0750: %+v", at)
	}
	if got := must[uint32](t, "ACCESS f")(c.Access(ctx, f, 0x1|0x4)); got != 0x1|0x4 {
		t.Errorf("ACCESS f READ|MODIFY: granted %#x", got)
	}

	s := must[[]byte](t, "SYMLINK s")(c.Symlink(ctx, d, "s", "f"))
	if got := must[string](t, "READLINK s")(c.Readlink(ctx, s)); got != "f" {
		t.Errorf("READLINK s: %q", got)
	}
	sub := must[[]byte](t, "MKDIR sub")(c.Mkdir(ctx, d, "sub", 0o755))
	ok(t, "RENAME f to sub/g", c.Rename(ctx, d, "f", sub, "g"))
	if got, err := c.Lookup(ctx, sub, "g"); err != nil || !bytes.Equal(got, f) {
		t.Errorf("LOOKUP sub/g: %x, %v, want f's handle %x", got, err, f)
	}
	ok(t, "REMOVE sub/g", c.Remove(ctx, sub, "g"))
	ok(t, "RMDIR sub", c.Rmdir(ctx, d, "sub"))

	// Enough entries for several pages.
	want := map[string]bool{"s": true}
	for i := range 300 {
		name := fmt.Sprintf("entry-%03d", i)
		must[[]byte](t, "CREATE "+name)(c.Create(ctx, d, name, nfsclient.Guarded, 0o644))
		want[name] = true
	}
	ents := must[[]nfsclient.DirEntry](t, "READDIRPLUS d")(c.ReadDirPlus(ctx, d))
	for _, e := range ents {
		if !want[e.Name] {
			t.Errorf("READDIRPLUS d: unexpected or repeated entry %q", e.Name)
			continue
		}
		delete(want, e.Name)
		if e.Attr == nil || e.Attr.Fileid != e.Fileid {
			t.Errorf("READDIRPLUS d: %s: attributes %+v, fileid %#x", e.Name, e.Attr, e.Fileid)
		}
		if got, err := c.Lookup(ctx, d, e.Name); err != nil || !bytes.Equal(got, e.Handle) {
			t.Errorf("READDIRPLUS d: %s: handle %x, LOOKUP gives %x, %v", e.Name, e.Handle, got, err)
		}
	}
	if len(want) != 0 {
		t.Errorf("READDIRPLUS d: %d entries missing", len(want))
	}

	if st := must[nfsclient.FSStat](t, "FSSTAT")(c.Fsstat(ctx, root)); st.TotalBytes == 0 || st.AvailBytes > st.TotalBytes {
		t.Errorf("FSSTAT: %+v", st)
	}
}

func must2(t *testing.T, what string) func(b []byte, eof bool, err error) ([]byte, bool) {
	return func(b []byte, eof bool, err error) ([]byte, bool) {
		t.Helper()
		ok(t, what, err)
		return b, eof
	}
}

// TestConcurrentUse runs calls of several goroutines through one Client:
// each gets its own reply.
func TestConcurrentUse(t *testing.T) {
	ctx := testCtx(t)
	addr, _ := serve(t, "127.0.0.1:0", t.TempDir())
	c := nfsclient.New(newDialer(addr).dial)
	defer c.Close()
	root := must[[]byte](t, "MNT /")(c.Mount(ctx, "/"))
	var wg sync.WaitGroup
	for k := range 4 {
		wg.Go(func() {
			name := fmt.Sprintf("f%d", k)
			f, err := c.Create(ctx, root, name, nfsclient.Guarded, 0o644)
			if err != nil {
				t.Errorf("CREATE %s: %v", name, err)
				return
			}
			for i := range 20 {
				content := fmt.Sprintf("%s-%02d", name, i)
				if _, err := c.Write(ctx, f, 0, []byte(content), nfsclient.FileSync); err != nil {
					t.Errorf("WRITE %s: %v", name, err)
					return
				}
				if got, _, err := c.Read(ctx, f, 0, 100); err != nil || string(got) != content {
					t.Errorf("READ %s: %q, %v, want %q", name, got, err, content)
					return
				}
			}
		})
	}
	wg.Wait()
}
