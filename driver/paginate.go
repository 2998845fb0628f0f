package driver

import (
	"sort"
	"strconv"

	"google.golang.org/grpc/codes"
)

// Pagination: entries are listed in ID order and a token is the ID of the
// first entry of the next page, so a token stays valid when that entry is
// deleted between pages (listing resumes at the next larger ID) and new
// entries are picked up when their ID sorts after the token. A page costs
// what it lists, not what the store holds: the store lists from the token
// on (Store.VolumesFrom), one entry past the page for the next token.

// page returns one page of a List call and the next token ("" on the last
// page). fetch lists, sorted by ID, the entries whose ID sorts at or after
// from, at most n of them (n 0: all). maxEntries 0 means no limit. A
// negative maxEntries answers InvalidArgument and a token not in our ID
// format answers Aborted (as the spec asks for ListVolumes).
func page[T any](token string, maxEntries int32, validToken func(string) bool, fetch func(from string, n int) []T, id func(T) string) ([]T, string, error) {
	if maxEntries < 0 {
		return nil, "", statusf(codes.InvalidArgument, "max_entries %d is negative", maxEntries)
	}
	if token != "" && !validToken(token) {
		return nil, "", statusf(codes.Aborted, "starting_token %s is not a token we issued", strconv.Quote(token))
	}
	n := 0
	if maxEntries > 0 {
		n = int(maxEntries) + 1 // one more: the next page's first, whose ID is the token
	}
	got := fetch(token, n)
	if maxEntries > 0 && len(got) > int(maxEntries) {
		return got[:maxEntries], id(got[maxEntries]), nil
	}
	return got, "", nil
}

// fromSorted is page's fetch over list, sorted by ID.
func fromSorted[T any](list []T, id func(T) string) func(from string, n int) []T {
	return func(from string, n int) []T {
		l := list[sort.Search(len(list), func(i int) bool { return id(list[i]) >= from }):]
		if n > 0 && len(l) > n {
			l = l[:n]
		}
		return l
	}
}

func volumeID(v VolumeInfo) string     { return v.ID }
func snapshotID(s SnapshotInfo) string { return s.ID }
