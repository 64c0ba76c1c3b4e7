package nfsd

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// TestStaleAndForgedHandles checks that a handle naming no live file of
// this export is answered NFS3ERR_STALE, never with another file: a
// removed file's handle after a new file took its name, a handle with its
// MAC or length damaged, a well-formed handle of an unknown ID, and the
// root handle of another export (every export's root has ID 1).
func TestStaleAndForgedHandles(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	f, st := c.create(root, "f")
	mustOK(t, "CREATE f", st)
	_, st = c.write(f, 0, []byte("first"), nfsclient.FileSync)
	mustOK(t, "WRITE f", st)
	mustOK(t, "REMOVE f", c.remove(root, "f"))
	f2, st := c.create(root, "f")
	mustOK(t, "CREATE f again", st)
	_, st = c.write(f2, 0, []byte("second"), nfsclient.FileSync)
	mustOK(t, "WRITE f again", st)
	if bytes.Equal(f, f2) {
		t.Fatalf("the new f got the removed f's handle %x", f)
	}

	idx, err := os.ReadFile(filepath.Join(dir, indexDir, fileName(1)))
	if err != nil {
		t.Fatal(err)
	}
	recs, _ := decodeAll(idx)
	key := handleKey(recs[0].key)
	flipped := append([]byte(nil), f2...)
	flipped[len(flipped)-1] ^= 1
	other := t.TempDir()
	addr2, _ := serve(t, other, Fsync{})
	otherRoot := dialNFS(t, addr2).mount("/")
	if bytes.Equal(otherRoot, root) {
		t.Fatal("two exports have the same root handle")
	}

	for name, fh := range map[string][]byte{
		"removed f":              f,
		"f with its MAC flipped": flipped,
		"f cut short":            f2[:handleLen-1],
		"unknown ID":             key.handle(0x0123456789abcdef),
		"another export's root":  otherRoot,
	} {
		if _, st := c.getattr(fh); st != nfsclient.StatusStale {
			t.Errorf("GETATTR of %s: status %d, want STALE", name, st)
		}
		if got, st := c.read(fh, 0, 100); st != nfsclient.StatusStale {
			t.Errorf("READ of %s: status %d (%q), want STALE", name, st, got)
		}
		if _, st := c.write(fh, 0, []byte("x"), nfsclient.FileSync); st != nfsclient.StatusStale {
			t.Errorf("WRITE of %s: status %d, want STALE", name, st)
		}
	}
	// The handle ToHandle returns when it cannot make one: go-nfs refuses
	// it before asking the handler (INVAL for a GETATTR).
	if _, st := c.getattr(nil); st == nfsclient.StatusOK {
		t.Error("GETATTR of an empty handle succeeded")
	}
	if got, st := c.read(nil, 0, 100); st != nfsclient.StatusStale {
		t.Errorf("READ of an empty handle: status %d (%q), want STALE", st, got)
	}
	// The index is out of every client's reach, and so is the tree above
	// the export.
	if _, st := c.lookup(root, indexDir); st != nfsclient.StatusNoEnt {
		t.Errorf("LOOKUP %s: status %d, want NOENT", indexDir, st)
	}
	if _, st := c.create(root, indexDir); st == nfsclient.StatusOK {
		t.Errorf("CREATE %s succeeded", indexDir)
	}
	if st := c.rename(root, "f", root, indexDir); st == nfsclient.StatusOK {
		t.Errorf("RENAME f to %s succeeded", indexDir)
	}
	for _, name := range []string{"..", "../x", "a/../../x"} {
		if _, st := c.create(root, name); st == nfsclient.StatusOK {
			t.Errorf("CREATE %q succeeded", name)
		}
		if st := c.remove(root, name); st == nfsclient.StatusOK {
			t.Errorf("REMOVE %q succeeded", name)
		}
	}
	for path, want := range map[string]uint32{"/nope": nfsclient.StatusNoEnt, "/f": nfsclient.StatusNotDir, "/.duet-nfs": nfsclient.StatusNoEnt} {
		if _, st := c.tryMount(path); st != want {
			t.Errorf("MOUNT %s: status %d, want %d", path, st, want)
		}
	}
	if got, st := c.read(f2, 0, 100); st != nfsclient.StatusOK || string(got) != "second" {
		t.Errorf("READ of the new f: status %d, %q", st, got)
	}
}

// TestHandleKey is the handle codec against damage and other keys.
func TestHandleKey(t *testing.T) {
	k := handleKey(bytes.Repeat([]byte{7}, keyLen))
	h := k.handle(42)
	if id, err := k.id(h); err != nil || id != 42 {
		t.Fatalf("round trip: %d, %v", id, err)
	}
	if len(h) != handleLen {
		t.Errorf("handle of %d bytes, want %d", len(h), handleLen)
	}
	if got := k.handle(rootID); !bytes.Equal(got, k.handle(rootID)) {
		t.Error("the root handle is not constant")
	}
	bad := map[string][]byte{
		"other key":    handleKey(bytes.Repeat([]byte{8}, keyLen)).handle(42),
		"long":         append(append([]byte(nil), h...), 0),
		"short":        h[:len(h)-1],
		"version 2":    append([]byte{2}, h[1:]...),
		"nil":          nil,
		"id changed":   append(append([]byte{h[0]}, k.handle(43)[1:9]...), h[9:]...),
		"mac bit flip": append(append([]byte(nil), h[:len(h)-1]...), h[len(h)-1]^0x80),
	}
	for name, b := range bad {
		if id, err := k.id(b); err == nil {
			t.Errorf("%s: accepted as ID %d", name, id)
		}
	}
}

// TestHandleRacesRename does what go-nfs does for a WRITE — resolve the
// handle, then open the path it got — with another client's rename of y
// over x in between: the open must fail, not open y, or the write with
// x's handle would land in y.
func TestHandleRacesRename(t *testing.T) {
	h := open(t, t.TempDir(), Fsync{})
	defer h.Close()
	hx := put(t, h, "x", "X")
	put(t, h, "y", "Y")
	fs, path, err := h.FromHandle(hx)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.fs.Rename("y", "x"); err != nil {
		t.Fatal(err)
	}
	f, err := fs.OpenFile(fs.Join(path...), os.O_RDWR, 0)
	if err == nil {
		f.Write([]byte("written with x's handle"))
		f.Close()
		b, _ := os.ReadFile(filepath.Join(h.fs.root.Name(), "x"))
		t.Fatalf("x's handle opened the file renamed over it, which now holds %q", b)
	}
	if !os.IsNotExist(err) {
		t.Errorf("opening with x's handle after x was replaced: %v, want not-exist", err)
	}
}
