package cow

import (
	"errors"
	"fmt"
	"regexp"
)

// Sentinel errors. Every error the package returns wraps one of them (or an
// I/O error from the file system); callers test with errors.Is.
var (
	// ErrNotFound: no volume or snapshot has that ID (or it was deleted).
	ErrNotFound = errors.New("cow: not found")
	// ErrExists: the ID is taken, by a volume or a snapshot (one namespace),
	// including a deleted object that still backs others (see doc.go).
	ErrExists = errors.New("cow: already exists")
	// ErrCorrupt: on-disk bytes failed a magic, version, length or CRC32C check,
	// or describe an impossible state.
	ErrCorrupt = errors.New("cow: corrupt store")
	// ErrInvalidID: the ID does not match ^[a-z0-9][a-z0-9-]{0,62}$.
	ErrInvalidID = errors.New("cow: invalid ID")
	// ErrInvalidated: the snapshot ran over its COW space limit; its data is gone.
	ErrInvalidated = errors.New("cow: snapshot invalidated")
	// ErrReadOnly: a write or discard to a snapshot.
	ErrReadOnly = errors.New("cow: read-only")
	// ErrShrink: Resize to a smaller size.
	ErrShrink = errors.New("cow: cannot shrink")
	// ErrOutOfRange: a read that starts at or past the end (an empty one at
	// the end returns 0, nil), a write or discard that does not fit
	// (starting inside and running past the end included), or a negative
	// offset.
	ErrOutOfRange = errors.New("cow: out of range")
	// ErrClosed: the store was closed, or failed (a log write or fsync error
	// makes the store refuse further changes until it is reopened).
	ErrClosed = errors.New("cow: store closed")
	// ErrNoSpace: the file system under the store is full.
	ErrNoSpace = errors.New("cow: no space")
	// ErrBadArgument: a size, chunk size, label set or option is out of bounds.
	ErrBadArgument = errors.New("cow: bad argument")
	// ErrSyncLost: Open refuses a store whose fsync failed earlier in this
	// boot of the machine (FORMAT.md, "After a failed fsync"): the page
	// cache, which Open would read, may hold data the disk lacks. A reboot
	// clears it; removing the store's "sync-lost" file opens it anyway. A
	// running store whose fsync failed reports it too, in Err (with
	// ErrClosed), since reopening it is refused then.
	ErrSyncLost = errors.New("cow: an fsync of the store failed in this boot")
	// ErrJournalDamaged: the kill journal holds bytes no kill of this
	// store leaves (a record that fails its check with records after it)
	// or a record its redo would refuse (a write outside its volume); it
	// wraps ErrCorrupt. Open refuses the store and changes nothing: the
	// journal holds writes answered before a kill. OpenDropJournal opens
	// it anyway, dropping the journal as a power loss would (FORMAT.md,
	// "A damaged journal").
	ErrJournalDamaged = fmt.Errorf("%w: damaged kill journal", ErrCorrupt)
	// ErrInUse: another open Store (in this or another process) holds the
	// directory's lock; see Open.
	ErrInUse = errors.New("cow: store directory in use")
)

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,62}$`)

func checkID(id string) error {
	if !idRE.MatchString(id) {
		return fmt.Errorf("%w: %q", ErrInvalidID, id)
	}
	return nil
}

func corruptf(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, a...)...)
}

// journalDamagef is corruptf for the kill journal's damage
// (ErrJournalDamaged).
func journalDamagef(format string, a ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrJournalDamaged}, a...)...)
}
