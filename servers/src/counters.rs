//! [`counter_set!`]: an engine's counters as one enum with a name each and an array of values,
//! so engines (plain code, no shared memory) count, and their servers copy the values into the
//! control block's named counters for `keepnet status`.

/// Declares `pub enum Ctr` (one variant per counter, with its `keepnet status` name and a
/// flag) and `pub struct Counters` (their values) in the calling module.
///
/// ```
/// keepnet_server::counter_set! {
///     /// True for the reasons a received datagram can be dropped for.
///     is_rx_drop;
///     RxDatagrams => "rx.datagrams", false;
///     DropShort => "drop.short", true;
/// }
/// let mut c = Counters::default();
/// c.inc(Ctr::DropShort);
/// assert_eq!(c.by_name("drop.short"), 1);
/// assert!(Ctr::DropShort.is_rx_drop());
/// ```
#[macro_export]
macro_rules! counter_set {
    ($(#[$fdoc:meta])* $flag:ident; $($id:ident => $name:literal, $f:literal;)*) => {
        /// A counter of the engine.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum Ctr {
            $(#[doc = $name] $id,)*
        }

        impl Ctr {
            /// Every counter, in display order.
            pub const ALL: &'static [Ctr] = &[$(Ctr::$id,)*];

            /// The counter's name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Ctr::$id => $name,)*
                }
            }

            $(#[$fdoc])*
            pub const fn $flag(self) -> bool {
                match self {
                    $(Ctr::$id => $f,)*
                }
            }
        }

        /// Values of every [`Ctr`].
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct Counters([u64; Ctr::ALL.len()]);

        impl Default for Counters {
            fn default() -> Self {
                Counters([0; Ctr::ALL.len()])
            }
        }

        impl Counters {
            /// Adds `n` to `c`.
            #[inline]
            pub fn add(&mut self, c: Ctr, n: u64) {
                if let Some(v) = self.0.get_mut(c as usize) {
                    *v = v.wrapping_add(n);
                }
            }
            /// Adds one to `c`.
            #[inline]
            pub fn inc(&mut self, c: Ctr) {
                self.add(c, 1)
            }
            /// Value of `c`.
            pub fn get(&self, c: Ctr) -> u64 {
                self.0.get(c as usize).copied().unwrap_or(0)
            }
            /// Value of the counter named `name` (0 if no such counter).
            pub fn by_name(&self, name: &str) -> u64 {
                Ctr::ALL
                    .iter()
                    .find(|c| c.name() == name)
                    .map_or(0, |c| self.get(*c))
            }
            /// Every counter with its name and value.
            pub fn iter(&self) -> impl Iterator<Item = (Ctr, &'static str, u64)> + '_ {
                Ctr::ALL.iter().map(|c| (*c, c.name(), self.get(*c)))
            }
        }
    };
}
