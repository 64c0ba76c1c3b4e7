package nfsd

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// published is what the workers of TestConcurrentClients tell the reader:
// each handle's content (written before the handle is published, never
// changed) and whether it may be gone.
type published struct {
	mu    sync.Mutex
	files map[string]*pubFile
}

type pubFile struct {
	fh      []byte
	content string
	gone    bool // removed or replaced, or about to be
}

func (p *published) add(fh []byte, content string) *pubFile {
	f := &pubFile{fh: fh, content: content}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.files[content] = f
	return f
}

func (p *published) markGone(f *pubFile) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f.gone = true
}

func (p *published) gone(content string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.files[content].gone
}

func (p *published) list() []pubFile {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]pubFile, 0, len(p.files))
	for _, f := range p.files {
		out = append(out, *f)
	}
	return out
}

// TestConcurrentClients runs clients that create, write, rename across
// directories, rename over each other's files and remove, while another
// reads every published handle: a handle reads its own content or, once
// its file is gone, STALE — never another file's bytes. Then the tree is
// copied and every handle checked on a new server.
func TestConcurrentClients(t *testing.T) {
	dir := t.TempDir()
	for k := 0; k < 4; k++ {
		os.Mkdir(filepath.Join(dir, fmt.Sprintf("w%d", k)), 0o755)
	}
	os.Mkdir(filepath.Join(dir, "shared"), 0o755)
	addr, stop := serve(t, dir, noSync{})
	pub := &published{files: map[string]*pubFile{}}
	var wg sync.WaitGroup
	done := make(chan struct{})
	for k := 0; k < 4; k++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dialNFS(t, addr)
			root := c.mount("/")
			own, _ := c.lookup(root, fmt.Sprintf("w%d", k))
			shared, _ := c.lookup(root, "shared")
			var prev *pubFile
			for i := 0; i < 40; i++ {
				name := fmt.Sprintf("w%d-f%d", k, i)
				fh, st := c.create(own, name)
				if st != nfsclient.StatusOK {
					t.Errorf("CREATE %s: status %d", name, st)
					return
				}
				if _, st := c.write(fh, 0, []byte(name), nfsclient.FileSync); st != nfsclient.StatusOK {
					t.Errorf("WRITE %s: status %d", name, st)
					return
				}
				f := pub.add(fh, name)
				if st := c.rename(own, name, shared, name); st != nfsclient.StatusOK {
					t.Errorf("RENAME %s to shared: status %d", name, st)
				}
				switch {
				case i%3 == 0:
					pub.markGone(f)
					if st := c.remove(shared, name); st != nfsclient.StatusOK {
						t.Errorf("REMOVE %s: status %d", name, st)
					}
					f = nil
				case i%4 == 1 && prev != nil:
					pub.markGone(prev)
					if st := c.rename(shared, name, shared, prev.content); st != nfsclient.StatusOK {
						t.Errorf("RENAME %s over %s: status %d", name, prev.content, st)
					}
				}
				prev = f
			}
		}()
	}
	var readers sync.WaitGroup
	readers.Add(1)
	go func() {
		defer readers.Done()
		c := dialNFS(t, addr)
		for {
			select {
			case <-done:
				return
			default:
			}
			for _, f := range pub.list() {
				got, st := c.read(f.fh, 0, 100)
				switch {
				case st == nfsclient.StatusOK && string(got) == f.content:
				case (st == nfsclient.StatusStale || st == nfsclient.StatusNoEnt || st == nfsclient.StatusAccess) && pub.gone(f.content):
					// Marked before the removal, checked after the READ.
					// A removal between go-nfs's steps fails the later
					// one: NOENT, or ACCES from its stat.
				default:
					t.Errorf("READ of %s's handle: status %d, %q", f.content, st, got)
				}
			}
		}
	}()
	wg.Wait()
	close(done)
	readers.Wait()
	stop()

	copyDir := t.TempDir()
	copyTree(t, dir, copyDir)
	addr, _ = serve(t, copyDir, noSync{})
	c := dialNFS(t, addr)
	live := 0
	for _, f := range pub.list() {
		got, st := c.read(f.fh, 0, 100)
		switch {
		case f.gone && st == nfsclient.StatusStale:
		case !f.gone && st == nfsclient.StatusOK && string(got) == f.content:
			live++
		default:
			t.Errorf("after failover: READ of %s's handle (gone %v): status %d, %q", f.content, f.gone, st, got)
		}
	}
	if live == 0 {
		t.Error("no file left alive: the test checked nothing")
	}
}
