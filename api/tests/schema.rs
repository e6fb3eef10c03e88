//! The checked-in SDL (`api/schema.graphql`) is the schema the code builds: a change to the
//! public contract shows up in review as a change of that file.

#[test]
fn the_checked_in_sdl_matches_the_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
    let built = zpanel_api::schema::sdl();
    if std::env::var_os("ZPANEL_WRITE_SDL").is_some() {
        std::fs::write(path, &built).expect("writing the SDL");
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in == built,
        "api/schema.graphql is out of date; run `ZPANEL_WRITE_SDL=1 cargo test -p zpanel-api --test schema` and review the diff"
    );
}
