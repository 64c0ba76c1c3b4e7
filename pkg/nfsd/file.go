package nfsd

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// file is an open file of the export. go-nfs answers every WRITE it gets
// as FILE_SYNC: the DATA_SYNC and FILE_SYNC ones, and UNSTABLE ones too
// large for the proxy to take (rpc.go answers the others, and every
// COMMIT, without go-nfs). So a file go-nfs wrote or truncated is synced
// when go-nfs closes it, which it does before replying: the reply's
// claim is true.
type file struct {
	*os.File
	name   string
	sync   Syncer
	dirty  bool
	caller *cred // writes act as the caller: one by anyone but root clears set-user-ID
	// noteFailed keeps the errno of a failed write (fsys.noteFailed).
	noteFailed func(error)
}

// Name is the path go-nfs opened, relative to the export.
func (f *file) Name() string { return f.name }

func (f *file) Write(b []byte) (n int, err error) {
	f.dirty = true
	err = f.caller.as(func() error {
		n, err = f.File.Write(b)
		return err
	})
	f.noteFailed(err)
	return n, err
}

func (f *file) Truncate(size int64) error {
	f.dirty = true
	err := f.caller.as(func() error { return f.File.Truncate(size) })
	f.noteFailed(err)
	return err
}

// Close syncs a changed file first; a failed sync fails the WRITE.
func (f *file) Close() error {
	var err error
	if f.dirty {
		if serr := f.sync.Sync(f.File); serr != nil {
			err = fmt.Errorf("syncing %s: %w: %w", f.File.Name(), errSyncFailed, serr)
			f.noteFailed(err)
		}
	}
	if cerr := f.File.Close(); err == nil {
		err = cerr
	}
	return err
}

// Lock takes an exclusive flock; go-nfs does not call it.
func (f *file) Lock() error { return unix.Flock(int(f.Fd()), unix.LOCK_EX) }

// Unlock releases the flock.
func (f *file) Unlock() error { return unix.Flock(int(f.Fd()), unix.LOCK_UN) }
