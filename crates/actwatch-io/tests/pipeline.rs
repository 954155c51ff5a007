//! The batch pipeline's overlapped scoring (reading ahead, scoring the next batch while this
//! one's rows are added) gives exactly what pushing each batch in turn gives.

use actwatch_detect::monitor::MonitorOptions;
use actwatch_io::pipeline::{score_computations, ComputationScorer, NoProgress};
use actwatch_io::reader::{ReadOptions, TraceReader};
use actwatch_testkit::{fixture, minilm};

#[test]
fn overlapped_scoring_equals_pushing_batch_by_batch() {
    let (monitor, _) = fixture::fit_minilm(MonitorOptions::default(), &minilm::read_options());
    let input = [
        minilm::file("dev_ood_code.parquet"),
        minilm::file("dev_id.parquet"),
    ];
    let mut first = None;
    for batch_rows in [97, 1000, 8192] {
        let read = ReadOptions {
            batch_rows,
            ..minilm::read_options()
        };
        let overlapped = score_computations(&monitor, &input, &read, &NoProgress).unwrap();

        let read = ComputationScorer::read_options(&monitor, &read);
        let mut scorer = ComputationScorer::new(&monitor, &read);
        for batch in TraceReader::open(&input, read.clone()).unwrap() {
            scorer.push(&batch.unwrap()).unwrap();
        }
        let in_turn = scorer.finish();
        assert!(!in_turn.results.is_empty());
        assert_eq!(overlapped.ids, in_turn.ids, "batches of {batch_rows}");
        assert_eq!(
            overlapped.results, in_turn.results,
            "batches of {batch_rows}"
        );
        assert_eq!(overlapped.input_rows, in_turn.input_rows);
        // Nor do the batch boundaries change a result.
        let first = first.get_or_insert_with(|| in_turn.results.clone());
        assert_eq!(first, &in_turn.results, "batches of {batch_rows}");
    }
}
