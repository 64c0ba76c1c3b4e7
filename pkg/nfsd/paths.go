package nfsd

import (
	"encoding/hex"
	"io/fs"
	"strings"

	"golang.org/x/sys/unix"
)

// markerPrefix starts a path component that stands for a file by its
// handle. FromHandle gives go-nfs the file's path with its last component
// replaced by a marker, and every call of the filesystem maps the marker
// to the file's place at that moment, under the index's lock. Returning
// the plain path would let go-nfs open, a moment later, whatever another
// client renamed over that name: a WRITE with the old file's handle would
// land in the new file. The components before the marker only serve
// go-nfs's LOOKUP of "..". A NUL cannot be in a file name, and a marker a
// client sends as a name must carry a valid handle: it reaches nothing a
// handle would not.
const markerPrefix = "\x00"

func (s *fsys) marker(id uint64) string { return markerPrefix + hex.EncodeToString(s.key.handle(id)) }

// split parses a path that Join built, refusing empty, "." and ".."
// components.
func split(p string) ([]string, error) {
	if p == "" || p == "." || p == "/" {
		return nil, nil
	}
	comps := strings.Split(strings.TrimPrefix(p, "/"), "/")
	for _, c := range comps {
		if c == "" || c == "." || c == ".." {
			return nil, &fs.PathError{Op: "lookup", Path: p, Err: unix.EINVAL}
		}
	}
	return comps, nil
}

// expand maps a path go-nfs built to components under the root: a marker
// becomes its file's current place. The caller holds ix.tmu for reading,
// or ix.mu.
func (s *fsys) expand(p string) ([]string, error) {
	comps, err := split(p)
	if err != nil {
		return nil, err
	}
	for i := len(comps) - 1; i >= 0; i-- {
		c, ok := strings.CutPrefix(comps[i], markerPrefix)
		if !ok {
			continue
		}
		h, err := hex.DecodeString(c)
		if err != nil {
			return nil, &fs.PathError{Op: "lookup", Path: p, Err: unix.EINVAL}
		}
		id, err := s.key.id(h)
		if err != nil {
			return nil, &fs.PathError{Op: "lookup", Path: p, Err: unix.EINVAL}
		}
		base, ok := s.ix.t.path(id)
		if !ok {
			// Removed or replaced since go-nfs resolved the handle.
			return nil, &fs.PathError{Op: "lookup", Path: p, Err: unix.ENOENT}
		}
		return append(base, comps[i+1:]...), nil
	}
	return comps, nil
}

// real is expand for a lookup: the index directory does not exist for
// clients.
func (s *fsys) real(p string) ([]string, error) {
	comps, err := s.expand(p)
	if err == nil && len(comps) > 0 && comps[0] == indexDir {
		return nil, &fs.PathError{Op: "lookup", Path: p, Err: unix.ENOENT}
	}
	return comps, err
}

// realNew is expand for an object to create, rename or remove: never the
// root, never the index directory. ix.mu is held.
func (s *fsys) realNew(p string) ([]string, error) {
	comps, err := s.expand(p)
	switch {
	case err != nil:
		return nil, err
	case len(comps) == 0:
		return nil, &fs.PathError{Op: "create", Path: p, Err: unix.EBUSY}
	case comps[0] == indexDir:
		return nil, &fs.PathError{Op: "create", Path: p, Err: unix.EACCES}
	}
	return comps, nil
}

// idOf returns the ID of the object at p, giving it and any parent
// without one an ID (durably) first.
func (s *fsys) idOf(p string) (uint64, error) {
	s.ix.tmu.RLock()
	comps, err := s.real(p)
	var ids []uint64
	if err == nil {
		ids = s.ix.t.walk(comps)
	}
	s.ix.tmu.RUnlock()
	if err != nil {
		return 0, err
	}
	if len(ids) == len(comps) {
		return last(ids), nil
	}
	s.ix.mu.Lock()
	defer s.ix.mu.Unlock()
	if comps, err = s.real(p); err != nil {
		return 0, err
	}
	return s.ix.resolveLocked(comps)
}
