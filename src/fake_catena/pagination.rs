//! Cursor pagination for the list and logs endpoints. A cursor is opaque to the client (base64 of
//! a position): pass `next_page` back as `cursor` until it is null.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::catena::model::Page;

/// Where a page starts or ends, by item key (keys ascend and start at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cursor {
    /// The items after the one with this key.
    After(u64),
    /// The items before the one with this key.
    Before(u64),
}

impl Cursor {
    fn encode(self) -> String {
        let text = match self {
            Cursor::After(key) => format!("after:{key}"),
            Cursor::Before(key) => format!("before:{key}"),
        };
        URL_SAFE_NO_PAD.encode(text)
    }

    pub fn decode(cursor: &str) -> Option<Self> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(cursor).ok()?).ok()?;
        let (direction, key) = text.split_once(':')?;
        let key = key.parse().ok()?;
        match direction {
            "after" => Some(Cursor::After(key)),
            "before" => Some(Cursor::Before(key)),
            _ => None,
        }
    }
}

/// One page of `size` items of `items` (sorted by key) from `cursor`, with the cursors around it.
pub(super) fn paginate<T: Clone>(
    items: &[(u64, T)],
    cursor: Option<Cursor>,
    size: usize,
) -> Page<T> {
    let len = items.len();
    let (start, end) = match cursor {
        None => (0, size.min(len)),
        Some(Cursor::After(key)) => {
            let start = items.partition_point(|(k, _)| *k <= key);
            (start, (start + size).min(len))
        }
        Some(Cursor::Before(key)) => {
            let end = items.partition_point(|(k, _)| *k < key);
            (end.saturating_sub(size), end)
        }
    };
    let key_before = |index: usize| if index == 0 { 0 } else { items[index - 1].0 };
    Page {
        items: items[start..end]
            .iter()
            .map(|(_, item)| item.clone())
            .collect(),
        current_page: Some(Cursor::After(key_before(start)).encode()),
        current_page_backwards: Some(Cursor::Before(key_before(end) + 1).encode()),
        previous_page: (start > 0).then(|| Cursor::Before(key_before(start) + 1).encode()),
        next_page: (end < len).then(|| Cursor::After(key_before(end)).encode()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_walks_forward_and_previous_walks_back() {
        let items: Vec<(u64, u64)> = (1..=5).map(|k| (k * 10, k)).collect();
        let first = paginate(&items, None, 2);
        assert_eq!(first.items, vec![1, 2]);
        assert_eq!(first.previous_page, None);
        let second = paginate(
            &items,
            Cursor::decode(first.next_page.as_deref().unwrap()),
            2,
        );
        assert_eq!(second.items, vec![3, 4]);
        let third = paginate(
            &items,
            Cursor::decode(second.next_page.as_deref().unwrap()),
            2,
        );
        assert_eq!(third.items, vec![5]);
        assert_eq!(third.next_page, None);
        let back = paginate(
            &items,
            Cursor::decode(third.previous_page.as_deref().unwrap()),
            2,
        );
        assert_eq!(back.items, vec![3, 4]);
        assert_eq!(Cursor::decode("not a cursor"), None);
    }
}
