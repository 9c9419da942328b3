//! The wire enums as clap arguments: their names come from the enums themselves (strum's
//! `VariantNames`), so `--help`, the manual pages and the shells' completions list them, and a
//! name the daemon would not know is refused before any request is sent.

use std::str::FromStr;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use strum::VariantNames;

/// A parser accepting exactly `T`'s wire names.
pub(crate) fn one_of<T>() -> impl TypedValueParser<Value = T>
where
    T: FromStr + VariantNames + Clone + Send + Sync + 'static,
{
    PossibleValuesParser::new(T::VARIANTS.iter().copied())
        .try_map(|name| proto::wire::parse::<T>(&name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};
    use proto::prefetch::Prefetch;

    #[test]
    fn only_the_wire_names_are_accepted_and_they_are_listed() {
        let command = || {
            Command::new("t").arg(
                Arg::new("prefetch")
                    .long("prefetch")
                    .value_parser(one_of::<Prefetch>()),
            )
        };
        let matches = command()
            .try_get_matches_from(["t", "--prefetch", "working_set"])
            .unwrap();
        assert_eq!(
            matches.get_one::<Prefetch>("prefetch"),
            Some(&Prefetch::WorkingSet)
        );
        assert!(command()
            .try_get_matches_from(["t", "--prefetch", "all"])
            .is_err());
        let cmd = command();
        let arg = cmd.get_arguments().next().unwrap();
        let names: Vec<String> = arg
            .get_possible_values()
            .iter()
            .map(|v| v.get_name().to_owned())
            .collect();
        assert_eq!(names, Prefetch::VARIANTS);
    }
}
