//! Where each replication unit lies: the disk cut into zones, each with its
//! own unit size (a 4 KiB block, an extent of some size, or the zone whole).

use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::GranularityError;
use crate::units::size_flag;

/// One stretch of the disk replicated in units of `unit` bytes, counted from
/// `start` (the last unit is clipped to `end`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub start: u64,
    pub end: u64,
    pub unit: u64,
}

impl Zone {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Number of units (the last may be short).
    pub fn units(&self) -> u64 {
        self.len().div_ceil(self.unit)
    }

    /// Byte range of unit `index` of this zone.
    pub fn unit_range(&self, index: u64) -> Range<u64> {
        let start = self.start + index * self.unit;
        start..(start + self.unit).min(self.end)
    }
}

/// Zones covering `[0, size)` in order, without holes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub size: u64,
    pub zones: Vec<Zone>,
}

impl Layout {
    /// One unit size over the whole disk (`unit >= size`: the whole disk is one unit).
    pub fn uniform(size: u64, unit: u64) -> Result<Layout, GranularityError> {
        Layout::new(
            size,
            vec![Zone {
                start: 0,
                end: size,
                unit: unit.min(size.max(1)),
            }],
        )
    }

    /// Checks that `zones` cover `[0, size)` in order with non-zero units.
    pub fn new(size: u64, zones: Vec<Zone>) -> Result<Layout, GranularityError> {
        if size == 0 {
            return Err(GranularityError::EmptyDevice);
        }
        let mut at = 0;
        for z in &zones {
            if z.start != at || z.end <= z.start || z.unit == 0 {
                return Err(GranularityError::BadLayout {
                    what: format!(
                        "zone {}..{} (unit {}) does not continue at {at}",
                        z.start, z.end, z.unit
                    ),
                });
            }
            at = z.end;
        }
        if at != size {
            return Err(GranularityError::BadLayout {
                what: format!("the zones end at {at}, the disk at {size}"),
            });
        }
        Ok(Layout { size, zones })
    }

    /// Index of the zone holding `offset` (`offset < size`).
    pub fn zone_of(&self, offset: u64) -> usize {
        self.zones.partition_point(|z| z.end <= offset)
    }

    /// Bytes of dirty-tracking bits: one bit per unit.
    pub fn tracking_bytes(&self) -> u64 {
        self.zones.iter().map(Zone::units).sum::<u64>().div_ceil(8)
    }

    /// The smallest unit (what a single uniform dirty map would need).
    pub fn min_unit(&self) -> u64 {
        self.zones.iter().map(|z| z.unit).min().unwrap_or(4096)
    }

    /// Joins neighbours with the same unit where the unit divides the first's length.
    #[must_use]
    pub fn merged(mut self) -> Layout {
        let mut out: Vec<Zone> = Vec::with_capacity(self.zones.len());
        for z in self.zones.drain(..) {
            match out.last_mut() {
                Some(last) if last.unit == z.unit && last.len() % last.unit == 0 => {
                    last.end = z.end;
                }
                _ => out.push(z),
            }
        }
        Layout {
            size: self.size,
            zones: out,
        }
    }

    /// A short name: `4K`, `1M`, `whole volume`, or `mixed`.
    pub fn describe(&self) -> String {
        let first = self.zones[0].unit;
        if self.zones.iter().all(|z| z.unit == first) {
            if self.zones.len() == 1 && first >= self.size {
                return "whole image".into();
            }
            return size_flag(first);
        }
        if self.zones.iter().all(|z| z.unit >= z.len()) {
            return "whole volume".into();
        }
        "mixed".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_lookup_and_units_clip_at_the_end() {
        let l = Layout::new(
            10 << 20,
            vec![
                Zone {
                    start: 0,
                    end: 4 << 20,
                    unit: 4096,
                },
                Zone {
                    start: 4 << 20,
                    end: 10 << 20,
                    unit: 4 << 20,
                },
            ],
        )
        .expect("valid");
        assert_eq!(l.zone_of(0), 0);
        assert_eq!(l.zone_of((4 << 20) - 1), 0);
        assert_eq!(l.zone_of(4 << 20), 1);
        assert_eq!(l.zones[1].units(), 2);
        assert_eq!(l.zones[1].unit_range(1), (8 << 20)..(10 << 20));
        // 1024 + 2 units: 128.25 bytes of bits, rounded up.
        assert_eq!(l.tracking_bytes(), 129);
        assert_eq!(l.describe(), "mixed");
    }

    #[test]
    fn a_layout_with_a_hole_is_refused() {
        let e = Layout::new(
            8192,
            vec![Zone {
                start: 0,
                end: 4096,
                unit: 4096,
            }],
        );
        assert!(matches!(e, Err(GranularityError::BadLayout { .. })));
        assert!(matches!(
            Layout::uniform(0, 4096),
            Err(GranularityError::EmptyDevice)
        ));
    }

    #[test]
    fn merging_joins_equal_units() {
        let l = Layout::new(
            3 << 20,
            (0..3)
                .map(|i| Zone {
                    start: i << 20,
                    end: (i + 1) << 20,
                    unit: 65536,
                })
                .collect(),
        )
        .expect("valid")
        .merged();
        assert_eq!(l.zones.len(), 1);
        assert_eq!(l.describe(), "64K");
    }
}
