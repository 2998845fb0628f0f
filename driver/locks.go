package driver

import "sync"

// keyLocks is a set of per-key try-locks. A handler that cannot take the lock
// answers Aborted instead of queueing, as the CSI spec asks for an operation
// already in flight on the same object; this also means a stuck operation can
// never make later calls block forever.
type keyLocks struct {
	mu   sync.Mutex
	held map[string]struct{}
}

func newKeyLocks() *keyLocks { return &keyLocks{held: map[string]struct{}{}} }

// tryLock takes all keys or none; it reports whether it did.
func (l *keyLocks) tryLock(keys ...string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		if _, ok := l.held[k]; ok {
			return false
		}
	}
	for _, k := range keys {
		l.held[k] = struct{}{}
	}
	return true
}

func (l *keyLocks) unlock(keys ...string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range keys {
		delete(l.held, k)
	}
}
